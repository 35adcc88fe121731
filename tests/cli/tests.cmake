# `bench comm`'s arrival-skew probe under mpirun: gathered over MPI at 2 and 3 processes.
if(PARALLM_HAVE_MPI)
  string(JOIN " " flags ${PARALLM_MPIRUN_FLAGS})
  add_test(NAME cli_mpi_bench_comm_skew
           COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/mpi_bench_comm_check.sh $<TARGET_FILE:parallm_bin>
                   ${PARALLM_MPIRUN} "${flags}")
  set_tests_properties(cli_mpi_bench_comm_skew PROPERTIES LABELS "mpi;cli" TIMEOUT 120
                       ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
endif()
