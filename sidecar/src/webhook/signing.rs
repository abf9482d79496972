//! Ed25519 webhook signatures and the JWKS that publishes the public key.
//!
//! Signed message: `"{request_id}\n{user_id}\n{timestamp}\n{sha256_hex(body)}"`;
//! the signature is sent as lowercase hex in `X-Fal-Webhook-Signature`.

use std::path::{Path, PathBuf};

use base64::Engine;
use ed25519_dalek::{Signer as _, SigningKey};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write signing key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing key {0} is not an Ed25519 seed (expected 32 raw bytes, 64 hex characters or base64 of 32 bytes)")]
    Format(PathBuf),
    #[error("no randomness available to generate a signing key: {0}")]
    Random(String),
}

pub struct Signer {
    key: SigningKey,
    kid: String,
}

impl Signer {
    pub fn from_seed(seed: [u8; 32]) -> Signer {
        let key = SigningKey::from_bytes(&seed);
        let kid = hex::encode(&Sha256::digest(key.verifying_key().as_bytes())[..8]);
        Signer { key, kid }
    }

    /// Reads `--signing-key FILE`, or the key in the data dir, generating and persisting
    /// one (mode 0600) on first start.
    pub fn load_or_create(key_file: Option<&Path>, data_dir: &Path) -> Result<Signer, KeyError> {
        if let Some(path) = key_file {
            let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.into(),
                source,
            })?;
            return parse_seed(&bytes)
                .map(Signer::from_seed)
                .ok_or_else(|| KeyError::Format(path.into()));
        }
        let path = data_dir.join("webhook-signing.key");
        match std::fs::read(&path) {
            Ok(bytes) => parse_seed(&bytes)
                .map(Signer::from_seed)
                .ok_or(KeyError::Format(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
                write_private(&path, format!("{}\n", hex::encode(seed)).as_bytes()).map_err(
                    |source| KeyError::Write {
                        path: path.clone(),
                        source,
                    },
                )?;
                Ok(Signer::from_seed(seed))
            }
            Err(source) => Err(KeyError::Read { path, source }),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": …, "kid": …}]}`.
    pub fn jwks(&self) -> serde_json::Value {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.key.verifying_key().as_bytes());
        serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": "EdDSA", "use": "sig"}]})
    }

    /// An Ed25519 signature of `message` (the tokens of `/tokens/`).
    pub fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Whether `signature` is this key's over `message` (strict verification: no
    /// malleable signatures).
    pub fn verify_bytes(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.key
            .verifying_key()
            .verify_strict(message, &sig)
            .is_ok()
    }

    /// Lowercase hex of the signature over the fal webhook message.
    pub fn sign(&self, request_id: &str, user_id: &str, timestamp: u64, body: &[u8]) -> String {
        let message = format!(
            "{request_id}\n{user_id}\n{timestamp}\n{}",
            hex::encode(Sha256::digest(body))
        );
        hex::encode(self.key.sign(message.as_bytes()).to_bytes())
    }
}

fn parse_seed(bytes: &[u8]) -> Option<[u8; 32]> {
    if bytes.len() == 32 {
        return bytes.try_into().ok();
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if let Ok(raw) = hex::decode(text) {
        return raw.try_into().ok();
    }
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        if let Ok(raw) = engine.decode(text) {
            return raw.try_into().ok();
        }
    }
    None
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};

    #[test]
    fn signature_verifies_against_the_jwks_key() {
        let s = Signer::from_seed([7u8; 32]);
        let sig = s.sign("req", "owner", 1_700_000_000, b"{\"a\":1}");
        let jwks = s.jwks();
        let x = jwks["keys"][0]["x"].as_str().unwrap();
        let pk: [u8; 32] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(x)
            .unwrap()
            .try_into()
            .unwrap();
        let vk = VerifyingKey::from_bytes(&pk).unwrap();
        let msg = format!(
            "req\nowner\n1700000000\n{}",
            hex::encode(Sha256::digest(b"{\"a\":1}"))
        );
        let sig = Signature::from_bytes(&hex::decode(sig).unwrap().try_into().unwrap());
        vk.verify(msg.as_bytes(), &sig).unwrap();
        assert!(vk.verify(b"other", &sig).is_err());
    }

    #[test]
    fn key_is_created_once_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("fal-key-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Signer::load_or_create(None, &dir).unwrap();
        let b = Signer::load_or_create(None, &dir).unwrap();
        assert_eq!(a.jwks(), b.jwks());
        let file = dir.join("other.key");
        std::fs::write(&file, "not a key").unwrap();
        assert!(matches!(
            Signer::load_or_create(Some(&file), &dir),
            Err(KeyError::Format(_))
        ));
        std::fs::write(
            &file,
            base64::engine::general_purpose::STANDARD.encode([1u8; 32]),
        )
        .unwrap();
        assert_eq!(
            Signer::load_or_create(Some(&file), &dir).unwrap().jwks(),
            Signer::from_seed([1u8; 32]).jwks()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
