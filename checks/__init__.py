"""The checks of client bytes before concrete parses any of them: Cap'n Proto layouts of ciphertexts and
evaluation keys against what concrete-ml's own client makes for the model."""
