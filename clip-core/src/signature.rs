//! Key-based signatures on clip's index artifacts, in the form `cosign sign --key` writes them:
//! a Sigstore bundle (`application/vnd.dev.sigstore.bundle.v0.3+json`) attached to the signed
//! manifest as an OCI referrer, holding a DSSE envelope whose payload is an in-toto statement
//! naming the manifest's digest, signed with ECDSA P-256 over the envelope's pre-authentication
//! encoding. Keys are cosign public keys (PEM, `cosign generate-key-pair`). No transparency log is
//! consulted: trust comes from the configured keys alone.

use crate::digest::Digest;
use base64::Engine;
use p256::ecdsa::{signature::Verifier, DerSignature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use std::path::Path;

pub const MEDIA_TYPE_BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// What `cosign sign` states: "the key's holder signed this artifact". Other predicates the
/// same key may sign (an SBOM, a vulnerability scan, any attestation about the artifact) do
/// not say the index is one to believe.
const PREDICATE_TYPE: &str = "https://sigstore.dev/cosign/sign/v1";
/// The most bytes read for one signature bundle.
pub const MAX_BUNDLE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("public key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("signature bundle: {0}")]
    Bundle(String),
    #[error("no configured key verifies the signature")]
    NotTrusted,
    #[error("the signature is for {signed}, not {expected}")]
    OtherSubject { signed: String, expected: Digest },
}

/// The public keys signatures must verify with.
#[derive(Clone, Default)]
pub struct TrustedKeys(Vec<VerifyingKey>);

impl std::fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustedKeys({} keys)", self.0.len())
    }
}

impl TrustedKeys {
    /// Reads cosign public keys (PEM SubjectPublicKeyInfo, ECDSA P-256).
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Self, SignatureError> {
        let mut keys = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let err = |reason: String| SignatureError::Key {
                path: p.display().to_string(),
                reason,
            };
            let pem = std::fs::read_to_string(p).map_err(|e| err(e.to_string()))?;
            keys.push(
                VerifyingKey::from_public_key_pem(&pem)
                    .map_err(|e| err(format!("not an ECDSA P-256 public key: {e}")))?,
            );
        }
        Ok(TrustedKeys(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks a bundle: one of its signatures verifies with one of the keys, and the statement
    /// it signs names `subject` (a manifest digest).
    pub fn verify_bundle(&self, bundle: &[u8], subject: &Digest) -> Result<(), SignatureError> {
        let bad = |what: &str| SignatureError::Bundle(what.to_string());
        let b64 = base64::engine::general_purpose::STANDARD;
        let v: serde_json::Value =
            serde_json::from_slice(bundle).map_err(|e| SignatureError::Bundle(e.to_string()))?;
        let env = &v["dsseEnvelope"];
        let payload_type = env["payloadType"].as_str().ok_or(bad("no payloadType"))?;
        if payload_type != PAYLOAD_TYPE {
            return Err(bad("payload is not an in-toto statement"));
        }
        let payload = b64
            .decode(env["payload"].as_str().ok_or(bad("no payload"))?)
            .map_err(|_| bad("payload is not base64"))?;
        let pae = pae(payload_type, &payload);
        let verified = env["signatures"]
            .as_array()
            .ok_or(bad("no signatures"))?
            .iter()
            .filter_map(|s| b64.decode(s["sig"].as_str()?).ok())
            .filter_map(|der| DerSignature::from_bytes(&der).ok())
            .any(|sig| self.0.iter().any(|k| k.verify(&pae, &sig).is_ok()));
        if !verified {
            return Err(SignatureError::NotTrusted);
        }
        // Only what the signature covers is read from here on.
        let st: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|e| SignatureError::Bundle(e.to_string()))?;
        if st["_type"] != STATEMENT_TYPE {
            return Err(bad("not an in-toto v1 statement"));
        }
        if st["predicateType"] != PREDICATE_TYPE {
            return Err(SignatureError::Bundle(format!(
                "a signed statement of another kind ({}), not a cosign signature",
                st["predicateType"]
                    .to_string()
                    .chars()
                    .take(100)
                    .collect::<String>()
            )));
        }
        let names_subject = st["subject"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["digest"]["sha256"].as_str() == Some(&subject.hex()));
        if !names_subject {
            return Err(SignatureError::OtherSubject {
                signed: st["subject"].to_string().chars().take(200).collect(),
                expected: *subject,
            });
        }
        Ok(())
    }
}

/// DSSE's pre-authentication encoding: what the signature is over.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle `cosign sign --key` (3.1.1) wrote for manifest sha256:0b85...d111, and its key.
    const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2ZNsYOAzaSZtRRpL4tQWg6Gb82ux
y8jR4MVIIoZAQfrZJHSoKGHgULy2zM7WviCCgza9t7dg+sZO8z6t6bJthw==
-----END PUBLIC KEY-----
";
    const BUNDLE: &str = r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"publicKey":{"hint":"6AI/KWYPQI+lQnG8S8sD0kOsTk4D+jNefhdxIpuG6iQ="}},"dsseEnvelope":{"payload":"eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEiLCJzdWJqZWN0IjpbeyJkaWdlc3QiOnsic2hhMjU2IjoiMGI4NTM5MzVkODhlNmM5N2IwMzlmYTkwOGZlMTkzODUzMjMyOWRmZDRiOTY1NWY2YzdhY2Y0MmVlODkwZDExMSJ9LCJhbm5vdGF0aW9ucyI6e319XSwicHJlZGljYXRlVHlwZSI6Imh0dHBzOi8vc2lnc3RvcmUuZGV2L2Nvc2lnbi9zaWduL3YxIiwicHJlZGljYXRlIjp7fX0=","payloadType":"application/vnd.in-toto+json","signatures":[{"sig":"MEYCIQCrWSmWDVBdNPERWO72+TkPxgHE0NqY9Z9tfNBPpfiQ6wIhAPUmRNWdhs9PmHaGzMwl4BsuxeadId0ATVJIncYDJg/H"}]}}"#;

    fn keys(pem: &str) -> TrustedKeys {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pub");
        std::fs::write(&p, pem).unwrap();
        TrustedKeys::load(&[p]).unwrap()
    }

    #[test]
    fn a_cosign_bundle_verifies_with_its_key_and_subject_only() {
        let subject: Digest =
            "sha256:0b853935d88e6c97b039fa908fe1938532329dfd4b9655f6c7acf42ee890d111"
                .parse()
                .unwrap();
        let k = keys(KEY);
        k.verify_bundle(BUNDLE.as_bytes(), &subject).unwrap();
        // Another subject: refused.
        assert!(matches!(
            k.verify_bundle(BUNDLE.as_bytes(), &Digest::of(b"other")),
            Err(SignatureError::OtherSubject { .. })
        ));
        // Another key: refused.
        let other = p256::ecdsa::SigningKey::from_bytes(&[7u8; 32].into()).unwrap();
        let pem = p256::pkcs8::EncodePublicKey::to_public_key_pem(
            other.verifying_key(),
            Default::default(),
        )
        .unwrap();
        assert!(matches!(
            keys(&pem).verify_bundle(BUNDLE.as_bytes(), &subject),
            Err(SignatureError::NotTrusted)
        ));
        // A payload changed after signing: refused.
        let tampered = BUNDLE.replace("eyJfdHlwZSI6", "eyJfdHlwZSI7");
        assert!(k.verify_bundle(tampered.as_bytes(), &subject).is_err());
        // Garbage: an error, not a panic.
        assert!(k.verify_bundle(b"{", &subject).is_err());
        assert!(TrustedKeys::load(&["/nonexistent.pub"]).is_err());
    }

    /// A bundle of `statement`, signed by `key` as cosign signs.
    fn signed(key: &p256::ecdsa::SigningKey, statement: &serde_json::Value) -> String {
        use p256::ecdsa::signature::Signer;
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = serde_json::to_vec(statement).unwrap();
        let sig: p256::ecdsa::Signature = key.sign(&pae(PAYLOAD_TYPE, &payload));
        serde_json::json!({
            "dsseEnvelope": {
                "payload": b64.encode(&payload),
                "payloadType": PAYLOAD_TYPE,
                "signatures": [{"sig": b64.encode(sig.to_der().as_bytes())}],
            }
        })
        .to_string()
    }

    #[test]
    fn only_a_cosign_signature_counts_not_another_statement_by_the_same_key() {
        let key = p256::ecdsa::SigningKey::from_bytes(&[9u8; 32].into()).unwrap();
        let trusted = TrustedKeys(vec![*key.verifying_key()]);
        let subject = Digest::of(b"an index artifact");
        let statement = |predicate: &str| {
            serde_json::json!({
                "_type": STATEMENT_TYPE,
                "subject": [{"digest": {"sha256": subject.hex()}}],
                "predicateType": predicate,
                "predicate": {},
            })
        };
        let sign = signed(&key, &statement(PREDICATE_TYPE));
        trusted.verify_bundle(sign.as_bytes(), &subject).unwrap();
        // The same key's attestation of something else about the artifact (an SBOM, say).
        let sbom = signed(&key, &statement("https://spdx.dev/Document"));
        let e = trusted
            .verify_bundle(sbom.as_bytes(), &subject)
            .unwrap_err();
        assert!(e.to_string().contains("not a cosign signature"), "{e}");
    }
}
