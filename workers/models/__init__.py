"""Model code for the Llama family (Llama, Mistral, Qwen2), Qwen3, and the mixture-of-experts
Qwen3-MoE and Mixtral, with tensor/pipeline/expert-parallel layers."""
