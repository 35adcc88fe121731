# Extra ctest entries of the train module (MPI launches, end-to-end scripts) go here, one block
# each. The unit tests in tests/train/*.cpp build into test_train and are discovered by
# tests/CMakeLists.txt; the PyTorch references they call live in tests/reference/
# (adamw_ref.py: the optimizer). The KJV corpus script is tested from tests/cli/tokenize_test.cpp.

# Training under mpirun, one process per rank: the losses of one rank, and with --ep on a
# Mixtral-style model the load-balancing losses too (tests/train/mpi_train_check.sh).
if(PARALLM_HAVE_MPI)
  string(JOIN " " flags ${PARALLM_MPIRUN_FLAGS})
  foreach(case "dp2:2:--dp 2:dense" "tp2dp2_zero:4:--tp 2 --dp 2 --zero 1:dense"
               "dp3_zero:3:--dp 3 --zero 1:dense" "tp3:3:--tp 3:dense"
               "tp2pp2dp2:8:--tp 2 --pp 2 --dp 2:dense" "pp2zb:2:--pp 2 --schedule zb-h1:dense"
               "moe_ep2:2:--ep 2:moe" "moe_tp2ep2:4:--tp 2 --ep 2:moe")
    string(REPLACE ":" ";" parts "${case}")
    list(GET parts 0 name)
    list(GET parts 1 np)
    list(GET parts 2 layout)
    list(GET parts 3 model)
    add_test(NAME train_mpi_${name}
             COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/train/mpi_train_check.sh
                     $<TARGET_FILE:parallm_bin> ${PARALLM_MPIRUN} "${flags}" ${np} "${layout}"
                     ${model})
    set_tests_properties(train_mpi_${name} PROPERTIES LABELS "mpi;train" TIMEOUT 300
                         ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
  endforeach()
endif()

# scripts/trace-timeline.py draws a real --trace (tests/train/trace_timeline_check.sh).
add_test(NAME train_trace_timeline
         COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/train/trace_timeline_check.sh
                 $<TARGET_FILE:parallm_bin> ${PROJECT_SOURCE_DIR}/scripts/trace-timeline.py)
set_tests_properties(train_trace_timeline PROPERTIES LABELS "train" TIMEOUT 120)
