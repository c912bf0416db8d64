//! `nodeward::fuzzing::ca_response`: what it feeds and what must hold is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nodeward::fuzzing::ca_response(data));
