# The tokenizer tests train a tiny sentencepiece model with the C++ trainer (Debian's
# libsentencepiece-dev ships libsentencepiece_train beside libsentencepiece).
if(TARGET test_model)
  target_link_libraries(test_model PRIVATE sentencepiece_train)
endif()
