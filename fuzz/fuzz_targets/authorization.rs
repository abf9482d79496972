//! Credentials on arbitrary bytes: the `Authorization` parser, the `fal_jwt_token`
//! query split and token verification never panic; a parsed key is well formed.
#![no_main]

use fal_sidecar::auth::header::{parse_authorization, take_query_token, Credential, Parsed};
use fal_sidecar::auth::token;
use fal_sidecar::webhook::signing::Signer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Parsed::Ours(Credential::Key { id, secret }) = parse_authorization(data) {
        assert!(!id.is_empty() && !secret.is_empty() && !id.contains(':'));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = take_query_token(text);
        let signer = Signer::from_seed([1; 32]);
        assert!(token::verify(&signer, text, 0).is_err() || text.split('.').count() == 3);
    }
});
