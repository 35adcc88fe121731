# Tensor-parallel generation under mpirun, one process per rank: same tokens and logits as one rank.
if(PARALLM_HAVE_MPI)
  string(JOIN " " flags ${PARALLM_MPIRUN_FLAGS})
  foreach(case tiny:2 tiny:3 stories:2 stories:4)
    string(REPLACE ":" ";" parts ${case})
    list(GET parts 0 model)
    list(GET parts 1 np)
    set(path ${model})
    if(model STREQUAL "stories")
      set(path ${PROJECT_SOURCE_DIR}/models/stories260K/stories260K.bin)
    endif()
    add_test(NAME engine_mpi_tp_${model}_np${np}
             COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/engine/mpi_tp_check.sh $<TARGET_FILE:parallm_bin>
                     ${PARALLM_MPIRUN} "${flags}" ${np} ${path} 12)
    set_tests_properties(engine_mpi_tp_${model}_np${np} PROPERTIES LABELS "mpi;engine" TIMEOUT 300
                         ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
  endforeach()
  # Pipeline and hybrid layouts: a batch of three prompts (the last one fed 2 tokens per step,
  # against whole prompts on one rank).
  # tp2pp2_split: the activations cross in halves, all-gathered (--pp-split on; auto is off on
  # one machine).
  foreach(case "pp2:2:--pp 2" "tp2pp2:4:--tp 2 --pp 2" "pp3:3:--pp 3 --pp-layers 1,3,1"
               "tp2pp2_chunks:4:--tp 2 --pp 2 --prefill-chunk 2"
               "tp2pp2_split:4:--tp 2 --pp 2 --pp-split on")
    string(REPLACE ":" ";" parts "${case}")
    list(GET parts 0 name)
    list(GET parts 1 np)
    list(GET parts 2 layout)
    add_test(NAME engine_mpi_${name}
             COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/engine/mpi_tp_check.sh $<TARGET_FILE:parallm_bin>
                     ${PARALLM_MPIRUN} "${flags}" ${np}
                     ${PROJECT_SOURCE_DIR}/models/stories260K/stories260K.bin 10 "${layout}")
    set_tests_properties(engine_mpi_${name} PROPERTIES LABELS "mpi;engine" TIMEOUT 300
                         ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
  endforeach()
  # Expert parallelism (mixture of experts): EP 2, EP 4 and EP 2 x TP 2 as processes; vLLM's
  # layout (whole experts over the TP ranks) at TP 2 (one prompt) and TP 2 x PP 2.
  foreach(case "ep2:2:--ep 2" "ep4:4:--ep 4" "ep2tp2:4:--ep 2 --tp 2"
          "tp2_expert_parallel:2:--tp 2 --enable-expert-parallel"
          "tp2pp2_expert_parallel:4:--tp 2 --pp 2 --enable-expert-parallel")
    string(REPLACE ":" ";" parts "${case}")
    list(GET parts 0 name)
    list(GET parts 1 np)
    list(GET parts 2 layout)
    add_test(NAME engine_mpi_moe_${name}
             COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/engine/mpi_tp_check.sh $<TARGET_FILE:parallm_bin>
                     ${PARALLM_MPIRUN} "${flags}" ${np} mixtral-tiny 10 "${layout}")
    set_tests_properties(engine_mpi_moe_${name} PROPERTIES LABELS "mpi;engine;moe" TIMEOUT 300
                         ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
  endforeach()
  # Serving (engine/serve_engine.h): rank 0's process serves, the others follow its plans (PP 2;
  # TP 2 x PP 2).
  foreach(np 2 4)
    add_test(NAME engine_mpi_serve_np${np}
             COMMAND ${PARALLM_MPIRUN} ${PARALLM_MPIRUN_FLAGS} -np ${np} $<TARGET_FILE:test_engine>
                     --gtest_filter=ServeMpi.*)
    set_tests_properties(engine_mpi_serve_np${np} PROPERTIES LABELS "mpi;engine" TIMEOUT 180
                         ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
  endforeach()
  # qwen2_moe (shared expert, q/k/v biases): EP 2 x TP 2 as processes.
  add_test(NAME engine_mpi_qwen2_moe_ep2tp2
           COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/engine/mpi_tp_check.sh $<TARGET_FILE:parallm_bin>
                   ${PARALLM_MPIRUN} "${flags}" 4 qwen2-moe-tiny 10 "--ep 2 --tp 2")
  set_tests_properties(engine_mpi_qwen2_moe_ep2tp2 PROPERTIES LABELS "mpi;engine;moe" TIMEOUT 300
                       ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
endif()

# `bench prefill` over MPI: the prompt pass through two pipeline stages, and TP across two processes.
if(PARALLM_HAVE_MPI)
  string(JOIN " " flags ${PARALLM_MPIRUN_FLAGS})
  add_test(NAME engine_mpi_bench_prefill
           COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/engine/mpi_prefill_check.sh $<TARGET_FILE:parallm_bin>
                   ${PARALLM_MPIRUN} "${flags}" ${PROJECT_SOURCE_DIR}/models/stories260K/stories260K.bin)
  set_tests_properties(engine_mpi_bench_prefill PROPERTIES LABELS "mpi;engine" TIMEOUT 300
                       ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
endif()
