# Extra ctest entries of the train module (MPI launches, end-to-end scripts) go here, one block
# each. The unit tests in tests/train/*.cpp build into test_train and are discovered by
# tests/CMakeLists.txt; the PyTorch references they call live in tests/reference/
# (adamw_ref.py: the optimizer). The KJV corpus script is tested from tests/cli/tokenize_test.cpp.
