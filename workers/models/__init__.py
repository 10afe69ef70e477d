"""Model code for the Llama family (Llama, Mistral, Qwen2) with tensor/pipeline-parallel layers."""
