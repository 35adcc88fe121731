# `parallm playground`: its API against the CLI (api_check.py: /api/plan == plan --json, the
# schedule numbers, layer-split bytes == the planner's, a real trace's bubble, 400s on bad input),
# and the page in headless Chromium (browser_check.sh: playwright-core from npm, pinned; skipped,
# exit 77, without Chromium or the npm registry). Screenshots: <build>/playground-screenshots/.
add_test(NAME playground_api
         COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/api_check.py $<TARGET_FILE:parallm_bin>
                 ${PROJECT_SOURCE_DIR})
set_tests_properties(playground_api PROPERTIES LABELS "playground;e2e" TIMEOUT 120)
add_test(NAME playground_browser
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/browser_check.sh $<TARGET_FILE:parallm_bin>
                 ${PROJECT_BINARY_DIR}/playground-screenshots)
set_tests_properties(playground_browser PROPERTIES SKIP_RETURN_CODE 77
                     LABELS "playground;browser;network" TIMEOUT 300)
