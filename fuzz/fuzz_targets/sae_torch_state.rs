#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sae_workbench_fuzz::sae_torch_state(data));
