//! Switchyard's inference planes. `llm` runs llama-family language models with
//! its own engine loop; the DNN plane for Triton model repositories joins it later.
pub mod llm;
