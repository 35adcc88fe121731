# A test that brings clusters up (tests/cluster/cluster_env.sh): run alone, skipped with exit 77.
function(parallm_cluster_test name script timeout)
  if(PARALLM_HAVE_MPI)
    add_test(NAME ${name}
             COMMAND bash ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/${script} $<TARGET_FILE:parallm_bin>)
    set_tests_properties(${name} PROPERTIES LABELS "mpi;cluster" TIMEOUT ${timeout}
                         SKIP_RETURN_CODE 77 RUN_SERIAL TRUE
                         ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
  endif()
endfunction()

# scripts/emulate-cluster.sh end to end (tests/cluster/emulate_cluster_check.sh): network
# namespaces joined by shaped veth links, Open MPI across them. Skipped (exit 77) without root,
# `ip netns` or tc; the script tears its cluster down whatever happens.
parallm_cluster_test(cluster_emulate emulate_cluster_check.sh 180)

# The grid's drawing (scripts/cluster/grid_svg.py) from a recorded grid output.
add_test(NAME cluster_grid_svg COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/grid_svg_check.sh)
set_tests_properties(cluster_grid_svg PROPERTIES LABELS "unit;cluster" TIMEOUT 60)

# The grid's summary (scripts/cluster/grid_summary.py) from a recorded grid's points.
add_test(NAME cluster_grid_summary COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/grid_summary_check.sh)
set_tests_properties(cluster_grid_summary PROPERTIES LABELS "unit;cluster" TIMEOUT 60)

# Re-predicting a recorded grid's points (scripts/cluster/grid_replan.py) with the planner.
add_test(NAME cluster_grid_replan
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/grid_replan_check.sh $<TARGET_FILE:parallm_bin>)
set_tests_properties(cluster_grid_replan PROPERTIES LABELS "unit;cluster" TIMEOUT 300)

# `emulate-cluster.sh grid` end to end at its smallest (tests/cluster/grid_check.sh): the tiny
# model, one preset, 2 runs a point, about 2 minutes; skipped as cluster_emulate is.
parallm_cluster_test(cluster_grid grid_check.sh 600)

# grid --crossover's summary (scripts/cluster/crossover_summary.py) on rates written by the test.
add_test(NAME cluster_crossover_summary COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/crossover_summary_check.sh)
set_tests_properties(cluster_crossover_summary PROPERTIES LABELS "unit;cluster" TIMEOUT 60)
