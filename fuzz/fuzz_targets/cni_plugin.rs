//! `nodeward::fuzzing::cni_plugin`: what it feeds and what must hold is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nodeward::fuzzing::cni_plugin(data));
