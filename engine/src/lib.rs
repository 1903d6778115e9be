//! Switchyard's inference planes. `llm` runs llama-family language models with
//! its own engine loop; `dnn` serves Triton model repositories.
pub mod dnn;
pub mod llm;
