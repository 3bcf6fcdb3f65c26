"""The pipeline's last step: a trained run written for other engines. `sftlab merge` (merge.py: a LoRA run merged
into a plain transformers folder), `sftlab export` (gguf.py: merged, converted by llama.cpp's own converter
(llama_cpp.py, llama_cpp_convert.py), its metadata fixed, an Ollama Modelfile beside it (ollama.py), and checked
by running it in llama.cpp against the model in transformers (eval/gguf_check.py, which `sftlab doctor --gguf`
runs too))."""
