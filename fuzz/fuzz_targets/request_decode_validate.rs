//! Request decoding and validation (S10): arbitrary bytes as the protobuf bodies of the
//! calls that carry user input, through the same checks the services run. Nothing may
//! panic; what validation accepts must hold the limits it names.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_node::api::filter::EventFilter;
use strata_node::api::validate;
use strata_node::limits::{EVENTS_PER_APPEND_MAX, EVENT_BYTES_MAX_DEFAULT, STREAM_NAME_BYTES_MAX};
use strata_proto::v1::{AppendRequest, ReadAllRequest, SubscribeRequest};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    match selector % 4 {
        0 => {
            if let Ok(request) = AppendRequest::decode(body) {
                let stream = request.stream.clone();
                if let Ok(command) = validate::append_command(request, body.len(), EVENT_BYTES_MAX_DEFAULT, 0) {
                    assert!(!stream.is_empty() && stream.len() <= STREAM_NAME_BYTES_MAX && !stream.starts_with('$'));
                    assert!(!command.events.is_empty() && command.events.len() <= EVENTS_PER_APPEND_MAX);
                    assert!(command.events.iter().all(|e| e.id != [0; 16] && !e.event_type.is_empty()));
                }
            }
        }
        1 => {
            if let Ok(request) = ReadAllRequest::decode(body) {
                let _ = EventFilter::from_read(request.filter);
            }
        }
        2 => {
            if let Ok(request) = SubscribeRequest::decode(body) {
                if let Ok(filter) = EventFilter::from_subscription(request.filter) {
                    let _ = filter;
                }
                let _ = validate::stream_name_shape("stream", &request.stream);
            }
        }
        _ => {
            // The auth layer's input: an `authorization` header and a token.
            if let Ok(text) = std::str::from_utf8(body) {
                let key = strata_security::auth::TokenKey::from_bytes([7; 32]);
                if let Ok(token) = strata_security::auth::bearer_token(text) {
                    assert!(key.verify(token, 0).is_err() || token.starts_with("strata1."));
                }
                let _ = strata_security::auth::check_user_name(text);
            }
        }
    }
});
