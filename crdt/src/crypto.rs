//! Keys, age envelopes and Ed25519 signatures (DESIGN "Identity and keys").
//!
//! - A device has an Ed25519 signing key (its libp2p PeerId; signs bundles and operations) and an
//!   age X25519 identity (receives document keys). Both are made from caller-supplied seeds.
//! - A document key of one epoch is an age X25519 identity; bundles are age-encrypted to it.
//! - At rest, a device's secrets are age-encrypted with its passphrase (age scrypt recipient).
//!
//! Every signature is over a domain-separation tag followed by the signed bytes, so a signature
//! made for one purpose never verifies for another.

use std::io::{Read, Write};
use std::iter;

use age::secrecy::SecretString;
use bech32::{Bech32, Hrp};
use libp2p_identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;

/// The scrypt work factor (log2 N) used for passphrase-wrapped keys unless told otherwise.
pub const PASSPHRASE_LOG_N_DEFAULT: u8 = 18;
/// The smallest scrypt work factor accepted when wrapping.
pub const PASSPHRASE_LOG_N_MIN: u8 = 10;
/// The smallest scrypt work factor a new key gets outside tests (2^16: about 60 ms and 64 MiB per
/// guess on this project's 2-core machines; 2^10 would be 64 times cheaper to attack).
pub const PASSPHRASE_LOG_N_SAFE_MIN: u8 = 16;
/// Shortest passphrase accepted for a new key, in Unicode scalar values.
pub const PASSPHRASE_CHARS_MIN: usize = 8;
/// The environment variable that, set to `1`, lets test harnesses wrap keys with a work factor below
/// [`PASSPHRASE_LOG_N_SAFE_MIN`] (the shells read it; see [`check_work_factor`]).
pub const WEAK_KDF_FOR_TESTS_ENV: &str = "MUSUBI_WEAK_KDF_FOR_TESTS";

/// The largest scrypt work factor accepted when unwrapping (bounds the time an attacker-chosen file costs).
pub const PASSPHRASE_LOG_N_MAX: u8 = 22;

/// The rule for the passphrase of a new key (a device's, the authority's): at least
/// [`PASSPHRASE_CHARS_MIN`] characters.
///
/// Errors: [`CryptoError::ShortPassphrase`].
pub fn check_passphrase(passphrase: &str) -> Result<(), CryptoError> {
    if passphrase.chars().count() < PASSPHRASE_CHARS_MIN {
        return Err(CryptoError::ShortPassphrase);
    }
    Ok(())
}

/// The rule for the scrypt work factor of a new key: within the range any key file may use, and at
/// least [`PASSPHRASE_LOG_N_SAFE_MIN`] unless `weak_kdf_for_tests` (a test harness said so with
/// [`WEAK_KDF_FOR_TESTS_ENV`]; the shells read it).
///
/// Errors: [`CryptoError::WorkFactor`] outside the range, [`CryptoError::WeakWorkFactor`] below the
/// safe minimum.
pub fn check_work_factor(log_n: u8, weak_kdf_for_tests: bool) -> Result<(), CryptoError> {
    if !(PASSPHRASE_LOG_N_MIN..=PASSPHRASE_LOG_N_MAX).contains(&log_n) {
        return Err(CryptoError::WorkFactor(log_n));
    }
    if log_n < PASSPHRASE_LOG_N_SAFE_MIN && !weak_kdf_for_tests {
        return Err(CryptoError::WeakWorkFactor(log_n));
    }
    Ok(())
}

/// Errors of key handling, sealing and signature checks.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The ciphertext is not for any of the given keys, or was altered.
    #[error("cannot decrypt: not encrypted to this key, or the data was altered")]
    Decrypt,
    /// The passphrase did not unwrap the key file.
    #[error("wrong passphrase, or the key file is damaged")]
    Passphrase,
    /// Encryption failed (for example: no recipients given).
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    /// A signature did not verify against the claimed signer.
    #[error("signature does not verify")]
    BadSignature,
    /// Key bytes or key text could not be decoded.
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    /// A work factor outside [`PASSPHRASE_LOG_N_MIN`]..=[`PASSPHRASE_LOG_N_MAX`].
    #[error("scrypt work factor {0} is outside {PASSPHRASE_LOG_N_MIN}..={PASSPHRASE_LOG_N_MAX}")]
    WorkFactor(u8),
    /// A new passphrase shorter than [`PASSPHRASE_CHARS_MIN`].
    #[error(
        "the passphrase must have at least {PASSPHRASE_CHARS_MIN} characters (パスフレーズは{PASSPHRASE_CHARS_MIN}文字以上にしてください)"
    )]
    ShortPassphrase,
    /// A work factor below [`PASSPHRASE_LOG_N_SAFE_MIN`] outside tests.
    #[error(
        "scrypt work factor {0} is too weak for a real key; use {PASSPHRASE_LOG_N_SAFE_MIN} or more (below that only for tests, with {WEAK_KDF_FOR_TESTS_ENV}=1)"
    )]
    WeakWorkFactor(u8),
}

/// Domain-separation tags for signatures.
pub mod domain {
    /// Bundle envelopes.
    pub const BUNDLE: &[u8] = b"musubi/bundle/v1\0";
    /// Document operations (create, membership, epochs).
    pub const DOC_OP: &[u8] = b"musubi/doc-op/v1\0";
    /// Key grants.
    pub const KEY_GRANT: &[u8] = b"musubi/key-grant/v1\0";
    /// The relay's directory.
    pub const DIRECTORY: &[u8] = b"musubi/directory/v2\0";
    /// The authority's certificate of a facility.
    pub const FACILITY_CERT: &[u8] = b"musubi/facility-cert/v1\0";
    /// A link of a facility's device chain.
    pub const DEVICE_LINK: &[u8] = b"musubi/device-link/v1\0";
    /// A device's request to join with an invite.
    pub const JOIN_REQUEST: &[u8] = b"musubi/join-request/v1\0";
    /// A device's registration of an invite it issued for another device of its facility.
    pub const INVITE_REGISTRATION: &[u8] = b"musubi/invite-registration/v1\0";
    /// An audit log entry (`audit::SignedEntry`).
    pub const AUDIT: &[u8] = b"musubi/audit/v1\0";
}

fn age_identity_from_seed(seed: [u8; 32]) -> age::x25519::Identity {
    let hrp = Hrp::parse("age-secret-key-").expect("constant hrp is valid");
    let text = bech32::encode::<Bech32>(hrp, &seed).expect("32 bytes fit a bech32 string");
    text.to_uppercase()
        .parse()
        .expect("a bech32 AGE-SECRET-KEY of 32 bytes always parses")
}

/// Parses an age X25519 recipient (`age1...`).
pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient, CryptoError> {
    text.parse()
        .map_err(|_| CryptoError::MalformedKey("age recipient"))
}

/// Encrypts `plaintext` with age to every recipient in `recipients` (one age file, one stanza each).
///
/// Errors: [`CryptoError::Encrypt`] when `recipients` is empty.
pub fn seal_to(
    recipients: &[age::x25519::Recipient],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
    let mut out = Vec::with_capacity(plaintext.len() + 200 + 50 * recipients.len());
    let mut writer = encryptor
        .wrap_output(&mut out)
        .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
    writer
        .write_all(plaintext)
        .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
    writer
        .finish()
        .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
    Ok(out)
}

/// Decrypts an age file with `identity`, refusing plaintexts longer than `max_bytes`.
pub fn open_with(
    identity: &dyn age::Identity,
    ciphertext: &[u8],
    max_bytes: usize,
) -> Result<Vec<u8>, CryptoError> {
    let decryptor = age::Decryptor::new_buffered(ciphertext).map_err(|_| CryptoError::Decrypt)?;
    let reader = decryptor
        .decrypt(iter::once(identity))
        .map_err(|_| CryptoError::Decrypt)?;
    let mut out = Vec::new();
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| CryptoError::Decrypt)?;
    if out.len() > max_bytes {
        return Err(CryptoError::Decrypt);
    }
    Ok(out)
}

/// Verifies `signature` by `device` over `domain || message`.
///
/// The Ed25519 public key is recovered from the device id (an identity-multihash PeerId).
pub fn verify(
    device: &DeviceId,
    domain: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), CryptoError> {
    let key = public_key_of(device)?;
    let mut buf = Vec::with_capacity(domain.len() + message.len());
    buf.extend_from_slice(domain);
    buf.extend_from_slice(message);
    if key.verify(&buf, signature) {
        Ok(())
    } else {
        Err(CryptoError::BadSignature)
    }
}

/// The Ed25519 public key inside an identity-multihash device id.
pub fn public_key_of(device: &DeviceId) -> Result<PublicKey, CryptoError> {
    // An identity multihash: code 0x00, then the digest length (one varint byte for keys under 128 bytes).
    let bytes = device.0.to_bytes();
    let digest = match bytes.as_slice() {
        [0x00, len, digest @ ..] if usize::from(*len) == digest.len() && *len < 0x80 => digest,
        _ => {
            return Err(CryptoError::MalformedKey(
                "device id does not embed its public key",
            ));
        }
    };
    PublicKey::try_decode_protobuf(digest)
        .map_err(|_| CryptoError::MalformedKey("device public key"))
}

/// A device's secrets: the Ed25519 signing key and the age X25519 identity.
///
/// Cloning copies the secrets in memory (for a second handle on the same unlocked device, e.g. the
/// desktop app's sync task); it never writes them anywhere.
#[derive(Clone)]
pub struct DeviceSecrets {
    keypair: Keypair,
    signing_seed: [u8; 32],
    age: age::x25519::Identity,
    age_seed: [u8; 32],
}

/// A device's public keys, as the directory records them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePublic {
    /// The device id (PeerId of the Ed25519 key; embeds the key).
    pub device: DeviceId,
    /// The age X25519 recipient (`age1...`) that document keys are wrapped to.
    pub age_recipient: String,
}

#[derive(Serialize, Deserialize)]
struct StoredSecrets {
    v: u8,
    #[serde(with = "serde_bytes")]
    signing_seed: [u8; 32],
    #[serde(with = "serde_bytes")]
    age_seed: [u8; 32],
}

impl DeviceSecrets {
    /// Makes device secrets from two independent 32-byte random seeds.
    pub fn from_seeds(signing_seed: [u8; 32], age_seed: [u8; 32]) -> Self {
        let mut s = signing_seed;
        let keypair =
            Keypair::ed25519_from_bytes(&mut s).expect("any 32 bytes are an Ed25519 secret key");
        Self {
            keypair,
            signing_seed,
            age: age_identity_from_seed(age_seed),
            age_seed,
        }
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::from_public_key(&self.keypair.public())
    }

    /// The libp2p keypair (the transport authenticates the device with it).
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The public half, as enrolment sends it to the relay.
    pub fn public(&self) -> DevicePublic {
        DevicePublic {
            device: self.device_id(),
            age_recipient: self.age.to_public().to_string(),
        }
    }

    /// The age identity (to open key grants and local snapshots).
    pub fn age_identity(&self) -> &age::x25519::Identity {
        &self.age
    }

    /// Signs `domain || message` with the device's Ed25519 key (64-byte signature).
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(domain.len() + message.len());
        buf.extend_from_slice(domain);
        buf.extend_from_slice(message);
        self.keypair
            .sign(&buf)
            .expect("Ed25519 signing cannot fail")
    }

    /// Wraps the secrets with a passphrase (age scrypt, work factor `log_n`).
    ///
    /// Errors: [`CryptoError::WorkFactor`] outside the accepted range.
    pub fn wrap(&self, passphrase: &str, log_n: u8) -> Result<Vec<u8>, CryptoError> {
        let mut plain = Vec::new();
        ciborium::into_writer(
            &StoredSecrets {
                v: 1,
                signing_seed: self.signing_seed,
                age_seed: self.age_seed,
            },
            &mut plain,
        )
        .expect("writing to a Vec cannot fail");
        let out = seal_with_passphrase(&plain, passphrase, log_n);
        plain.fill(0);
        out
    }

    /// Unwraps secrets written by [`DeviceSecrets::wrap`].
    ///
    /// Errors: [`CryptoError::Passphrase`] for a wrong passphrase or a damaged file.
    pub fn unwrap(wrapped: &[u8], passphrase: &str) -> Result<Self, CryptoError> {
        let mut plain = open_with_passphrase(wrapped, passphrase)?;
        let stored: Result<StoredSecrets, _> = ciborium::from_reader(plain.as_slice());
        plain.fill(0);
        let stored = stored.map_err(|_| CryptoError::Passphrase)?;
        Ok(Self::from_seeds(stored.signing_seed, stored.age_seed))
    }
}

/// Encrypts `plain` with a passphrase (age scrypt recipient, work factor `log_n`): how device and
/// authority keys rest on disk.
///
/// Errors: [`CryptoError::WorkFactor`] outside [`PASSPHRASE_LOG_N_MIN`]..=[`PASSPHRASE_LOG_N_MAX`].
pub fn seal_with_passphrase(
    plain: &[u8],
    passphrase: &str,
    log_n: u8,
) -> Result<Vec<u8>, CryptoError> {
    if !(PASSPHRASE_LOG_N_MIN..=PASSPHRASE_LOG_N_MAX).contains(&log_n) {
        return Err(CryptoError::WorkFactor(log_n));
    }
    let mut recipient = age::scrypt::Recipient::new(SecretString::from(passphrase.to_owned()));
    recipient.set_work_factor(log_n);
    age::encrypt(&recipient, plain).map_err(|e| CryptoError::Encrypt(e.to_string()))
}

/// Decrypts what [`seal_with_passphrase`] made, refusing work factors over [`PASSPHRASE_LOG_N_MAX`].
///
/// Errors: [`CryptoError::Passphrase`] for a wrong passphrase or damaged data.
pub fn open_with_passphrase(sealed: &[u8], passphrase: &str) -> Result<Vec<u8>, CryptoError> {
    let mut identity = age::scrypt::Identity::new(SecretString::from(passphrase.to_owned()));
    identity.set_max_work_factor(PASSPHRASE_LOG_N_MAX);
    age::decrypt(&identity, sealed).map_err(|_| CryptoError::Passphrase)
}

/// A device's secrets as 64 bytes (the Ed25519 seed, then the age seed), for a key file that holds
/// more than a device's keys (the deployment authority's). Handle with care; never log.
impl DeviceSecrets {
    /// The two seeds.
    pub fn to_seeds(&self) -> ([u8; 32], [u8; 32]) {
        (self.signing_seed, self.age_seed)
    }
}

/// The key of one epoch of one document: an age X25519 identity.
#[derive(Clone)]
pub struct DocumentKey {
    identity: age::x25519::Identity,
    seed: [u8; 32],
}

impl DocumentKey {
    /// Makes a document key from a 32-byte random seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            identity: age_identity_from_seed(seed),
            seed,
        }
    }

    /// The 32 secret bytes (only ever sealed to devices, never stored or sent in the clear).
    pub fn seed(&self) -> [u8; 32] {
        self.seed
    }

    /// Encrypts `plaintext` to this key.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        seal_to(&[self.identity.to_public()], plaintext)
    }

    /// The key's commitment: BLAKE3 (derive-key mode, context `musubi epoch key commitment v1`) of
    /// its age recipient text. A `Create` or `NewEpoch` operation names it, so a grant of any other
    /// key for that epoch is refused when opened (DESIGN "Identity and keys").
    pub fn commitment(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("musubi epoch key commitment v1");
        h.update(self.identity.to_public().to_string().as_bytes());
        *h.finalize().as_bytes()
    }

    /// Decrypts an age file sealed to this key, up to `max_bytes` of plaintext.
    pub fn open(&self, ciphertext: &[u8], max_bytes: usize) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.identity, ciphertext, max_bytes)
    }
}

impl std::fmt::Debug for DocumentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DocumentKey(..)")
    }
}

impl std::fmt::Debug for DeviceSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceSecrets({})", self.device_id())
    }
}

/// A sector of pseudonymous ids (DESIGN invariant 7, the sectoral-ID model): each has its own key,
/// so an id of one sector cannot be linked to the same card's id in another, and a facility holds
/// only the keys of the sectors its role works in ([`PseudonymKeys::for_role`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PseudonymSector {
    /// 避難所の受付と災害対策本部: evacuees' cards at check-in (避難者名簿), and HQ's view of them.
    Reception,
    /// 医療機関: patients' cards at a clinic or hospital.
    Clinic,
    /// 職員証: staff cards used to sign in, at every facility.
    Staff,
}

impl PseudonymSector {
    /// Every sector.
    pub const ALL: [Self; 3] = [Self::Reception, Self::Clinic, Self::Staff];

    /// Its name on the command line and in files (`reception`, `clinic`, `staff`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reception => "reception",
            Self::Clinic => "clinic",
            Self::Staff => "staff",
        }
    }

    /// Its name in Japanese, as staff see it (避難所受付・災害対策本部, 医療機関, 職員証).
    pub fn label_ja(self) -> &'static str {
        match self {
            Self::Reception => "避難所受付・災害対策本部",
            Self::Clinic => "医療機関",
            Self::Staff => "職員証",
        }
    }

    /// The sector whose cards a facility of `role` registers people by at its counter (residents,
    /// evacuees, patients), if any: 避難所・本部 → reception, 医療機関 → clinic; a care office none.
    pub fn of_residents(role: crate::ids::FacilityRole) -> Option<Self> {
        use crate::ids::FacilityRole;
        match role {
            FacilityRole::Shelter | FacilityRole::Hq => Some(Self::Reception),
            FacilityRole::Clinic => Some(Self::Clinic),
            FacilityRole::CareOffice => None,
        }
    }
}

impl std::fmt::Display for PseudonymSector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PseudonymSector {
    type Err = crate::ids::ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s.trim())
            .ok_or_else(|| {
                crate::ids::ParseIdError::new("pseudonym sector (reception, clinic or staff)", s)
            })
    }
}

/// The key of one sector, derived from the deployment's pseudonym secret, which only the
/// authority keeps: HKDF-SHA256 (RFC 5869) with no salt and the info `musubi pseudonym sector v1
/// <sector>`. Knowing one sector's key tells nothing of another's, nor of the secret.
pub fn pseudonym_sector_key(deployment_secret: &[u8; 32], sector: PseudonymSector) -> [u8; 32] {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, deployment_secret);
    let mut out = [0u8; 32];
    hk.expand(
        format!("musubi pseudonym sector v1 {}", sector.as_str()).as_bytes(),
        &mut out,
    )
    .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// The pseudonym keys a facility's devices hold: one per sector its role works in.
///
/// Issued by the deployment authority at approval, sealed to the joining device (the relay passes
/// the sealed bytes on and can open none); a device approving another device of its facility seals
/// the same keys again. The sealed plaintext is CBOR `{v: 1, keys: [[sector, bytes(32)], ...]}`;
/// a plaintext of exactly 32 bytes is the deployment secret itself, as approvals before sectors
/// sealed it, from which [`PseudonymKeys::from_plain`] keeps only the role's sectors.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PseudonymKeys {
    v: u8,
    keys: Vec<(PseudonymSector, serde_bytes::ByteArray<32>)>,
}

impl std::fmt::Debug for PseudonymKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PseudonymKeys({:?})", self.sectors())
    }
}

impl PseudonymKeys {
    /// Largest sealed plaintext accepted, in bytes.
    pub const PLAIN_BYTES_MAX: usize = 1024;

    /// The sectors a facility of `role` works in: every facility signs its staff in by card;
    /// shelters and HQ also hold reception's key (evacuee cards), clinics the clinic key.
    pub fn sectors_of(role: crate::ids::FacilityRole) -> Vec<PseudonymSector> {
        PseudonymSector::of_residents(role)
            .into_iter()
            .chain([PseudonymSector::Staff])
            .collect()
    }

    /// The keys the authority issues to a facility of `role`.
    pub fn for_role(deployment_secret: &[u8; 32], role: crate::ids::FacilityRole) -> Self {
        Self {
            v: 1,
            keys: Self::sectors_of(role)
                .into_iter()
                .map(|s| {
                    (
                        s,
                        serde_bytes::ByteArray::new(pseudonym_sector_key(deployment_secret, s)),
                    )
                })
                .collect(),
        }
    }

    /// The key of `sector`, if these keys include it.
    pub fn key(&self, sector: PseudonymSector) -> Option<&[u8; 32]> {
        self.keys
            .iter()
            .find(|(s, _)| *s == sector)
            .map(|(_, k)| &**k)
    }

    /// The sectors held.
    pub fn sectors(&self) -> Vec<PseudonymSector> {
        self.keys.iter().map(|(s, _)| *s).collect()
    }

    /// The check value the authority signs into the facility's certificate: BLAKE3 (derive-key
    /// mode, context `musubi pseudonym keys check v1`) of [`PseudonymKeys::to_plain`]. It reveals
    /// nothing of the keys; equal keys of equal sectors give equal values.
    pub fn check(&self) -> [u8; 32] {
        blake3::derive_key("musubi pseudonym keys check v1", &self.to_plain())
    }

    /// The plaintext to seal (CBOR, see the type's docs).
    pub fn to_plain(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Reads a sealed plaintext for a facility of `role`: the CBOR keys (only the role's sectors
    /// are kept, whatever else an approver sealed), or a bare 32-byte deployment secret.
    ///
    /// Errors: [`CryptoError::MalformedKey`] when it is neither.
    pub fn from_plain(plain: &[u8], role: crate::ids::FacilityRole) -> Result<Self, CryptoError> {
        let all = match <&[u8; 32]>::try_from(plain) {
            Ok(secret) => return Ok(Self::for_role(secret, role)),
            Err(_) => ciborium::from_reader::<Self, _>(plain)
                .ok()
                .filter(|k| k.v == 1)
                .ok_or(CryptoError::MalformedKey("pseudonym keys"))?,
        };
        Ok(Self {
            v: 1,
            keys: Self::sectors_of(role)
                .into_iter()
                .filter_map(|s| all.key(s).map(|k| (s, serde_bytes::ByteArray::new(*k))))
                .collect(),
        })
    }
}

/// A pseudonymous identifier: HMAC-SHA256 of `domain`, a zero byte and `input`, under a sector's
/// key ([`pseudonym_sector_key`]; DESIGN invariant 7).
pub fn pseudonym(sector_key: &[u8; 32], domain: &str, input: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(sector_key).expect("HMAC takes any key length");
    mac.update(domain.as_bytes());
    mac.update(&[0]);
    mac.update(input);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_gets_only_its_sectors_keys_and_sectors_do_not_link() {
        use crate::ids::FacilityRole;
        let secret = [7u8; 32];
        let keys: Vec<[u8; 32]> = PseudonymSector::ALL
            .iter()
            .map(|s| pseudonym_sector_key(&secret, *s))
            .collect();
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
        assert!(keys.iter().all(|k| *k != secret));
        assert_eq!(
            pseudonym_sector_key(&secret, PseudonymSector::Clinic),
            keys[1],
            "derivation is deterministic"
        );
        let card = b"IDm 0123456789ABCDEF";
        let ids: Vec<[u8; 32]> = keys.iter().map(|k| pseudonym(k, "felica", card)).collect();
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);

        let clinic = PseudonymKeys::for_role(&secret, FacilityRole::Clinic);
        assert_eq!(
            clinic.sectors(),
            [PseudonymSector::Clinic, PseudonymSector::Staff]
        );
        assert_eq!(clinic.key(PseudonymSector::Reception), None);
        let care = PseudonymKeys::for_role(&secret, FacilityRole::CareOffice);
        assert_eq!(care.sectors(), [PseudonymSector::Staff]);
        // An approver that sealed more than the role's sectors: only the role's are kept.
        let hq = PseudonymKeys::for_role(&secret, FacilityRole::Hq);
        let mut all = hq.clone();
        all.keys.extend(clinic.keys.clone());
        let kept = PseudonymKeys::from_plain(&all.to_plain(), FacilityRole::Shelter).expect("keys");
        assert_eq!(kept.sectors(), hq.sectors());
        // The bare deployment secret (approvals before sectors) gives the role's keys.
        assert_eq!(
            PseudonymKeys::from_plain(&secret, FacilityRole::Clinic).expect("keys"),
            clinic
        );
        assert!(PseudonymKeys::from_plain(b"junk", FacilityRole::Clinic).is_err());
    }

    #[test]
    fn signatures_verify_only_for_their_domain_and_signer() {
        let a = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let b = DeviceSecrets::from_seeds([3; 32], [4; 32]);
        let sig = a.sign(domain::BUNDLE, b"hello");
        assert!(verify(&a.device_id(), domain::BUNDLE, b"hello", &sig).is_ok());
        assert!(verify(&a.device_id(), domain::DOC_OP, b"hello", &sig).is_err());
        assert!(verify(&b.device_id(), domain::BUNDLE, b"hello", &sig).is_err());
        assert!(verify(&a.device_id(), domain::BUNDLE, b"hellO", &sig).is_err());
    }

    #[test]
    fn document_key_seals_only_for_itself() {
        let k = DocumentKey::from_seed([9; 32]);
        let other = DocumentKey::from_seed([8; 32]);
        let ct = k.seal("紹介状".as_bytes()).expect("seal");
        assert!(!ct.windows(9).any(|w| w == "紹介状".as_bytes()));
        assert_eq!(k.open(&ct, 1024).expect("open"), "紹介状".as_bytes());
        assert!(other.open(&ct, 1024).is_err());
        assert!(
            k.open(&ct, 3).is_err(),
            "plaintext over the limit is refused"
        );
    }

    #[test]
    fn passphrase_wrap_round_trips_and_refuses_wrong_passphrase() {
        let a = DeviceSecrets::from_seeds([5; 32], [6; 32]);
        let wrapped = a.wrap("correct horse", PASSPHRASE_LOG_N_MIN).expect("wrap");
        let b = DeviceSecrets::unwrap(&wrapped, "correct horse").expect("unwrap");
        assert_eq!(a.public(), b.public());
        assert!(matches!(
            DeviceSecrets::unwrap(&wrapped, "wrong"),
            Err(CryptoError::Passphrase)
        ));
        assert!(matches!(a.wrap("x", 5), Err(CryptoError::WorkFactor(5))));
    }

    #[test]
    fn sealing_to_several_devices_lets_each_open() {
        let a = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let b = DeviceSecrets::from_seeds([3; 32], [4; 32]);
        let c = DeviceSecrets::from_seeds([5; 32], [6; 32]);
        let rs =
            [a.public(), b.public()].map(|p| parse_recipient(&p.age_recipient).expect("recipient"));
        let ct = seal_to(&rs, b"key").expect("seal");
        assert_eq!(open_with(a.age_identity(), &ct, 16).expect("a"), b"key");
        assert_eq!(open_with(b.age_identity(), &ct, 16).expect("b"), b"key");
        assert!(open_with(c.age_identity(), &ct, 16).is_err());
    }
}
