#!/bin/sh
# Runs CMD on one core: world rank modulo the cores (Open MPI's OMPI_COMM_WORLD_RANK, MPICH's
# PMI_RANK). The emulated nodes share one machine, and each node's launcher would bind its own first
# rank to core 0; with more ranks than cores, consecutive ranks (one TP group, world rank = tp + pp
# x TP) go to different cores, so a stage's ranks never share one.
rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}
exec taskset -c "$((rank % $(nproc)))" "$@"
