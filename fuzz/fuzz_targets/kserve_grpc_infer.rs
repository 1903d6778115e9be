#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway::fuzz::kserve_grpc_infer(data));
