# The server's extra entries: the fake-engine server the npm client test talks to, the jinja2
# re-render of the chat template goldens, and the official `openai` npm client against it.
if(TARGET test_server)
  add_executable(parallm_fake_server ${CMAKE_CURRENT_LIST_DIR}/fake_server/main.cpp)
  target_link_libraries(parallm_fake_server PRIVATE parallm_server)
  target_include_directories(parallm_fake_server PRIVATE ${PROJECT_SOURCE_DIR}/tests)
  target_compile_options(parallm_fake_server PRIVATE -O1 -g0)
  add_dependencies(test_server parallm_fake_server)

  # Renders the fixtures with python3-jinja2 and compares with the checked-in goldens (skipped,
  # exit 77, where jinja2 is missing).
  add_test(NAME server_chat_template_jinja
           COMMAND sh -c "/usr/bin/python3 -c 'import jinja2' 2>/dev/null || exit 77; /usr/bin/python3 ${PROJECT_SOURCE_DIR}/tests/reference/chat_template_ref.py --check")
  set_tests_properties(server_chat_template_jinja PROPERTIES SKIP_RETURN_CODE 77 LABELS "unit;server")

  # The `openai` npm package (installed from the registry into a cache dir; skipped, exit 77,
  # without npm or a registry) against the fake server.
  add_test(NAME server_openai_node
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/openai_client_test.sh --fake $<TARGET_FILE:parallm_fake_server>)
  set_tests_properties(server_openai_node PROPERTIES SKIP_RETURN_CODE 77 LABELS "server;network" TIMEOUT 300)
endif()

# The real `parallm serve` end to end (serve_cli_check.sh): TP 2 x PP 2 threads on an ephemeral
# port against raw HTTP, the `openai` npm client (its part skipped without npm) and `parallm bench
# serve`, all greedy-exact against `parallm generate`; SIGTERM ends it. With MPI also
# `mpirun -np 2 parallm serve --pp 2`.
if(TARGET test_server)
  set(serve_cli_mpi "")
  if(PARALLM_HAVE_MPI)
    string(JOIN " " serve_cli_mpi_flags ${PARALLM_MPIRUN_FLAGS})
    set(serve_cli_mpi ${PARALLM_MPIRUN} "${serve_cli_mpi_flags}")
  endif()
  add_test(NAME server_serve_cli
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/serve_cli_check.sh $<TARGET_FILE:parallm_bin>
                   $<TARGET_FILE:test_server> ${serve_cli_mpi})
  set_tests_properties(server_serve_cli PROPERTIES LABELS "server;e2e" TIMEOUT 300
                       ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
endif()
