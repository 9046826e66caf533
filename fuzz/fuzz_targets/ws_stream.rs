//! Fuzz target `ws_stream`: raw client bytes into the WebSocket byte stream (WsIo over tungstenite); see `coordinator::fuzzing::ws_stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coordinator::fuzzing::ws_stream(data);
});
