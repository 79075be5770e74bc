//! The deployment authority's directory (`ADIR`): the municipality's key, kept off the relay host.
//!
//! Layout (made by `musubi-node authority init`; meant for a USB stick):
//! - `ADIR/authority.age`: the authority's Ed25519 and age seeds and the deployment's pseudonym secret
//!   (from which each sector's key is derived), CBOR sealed with the authority's passphrase (age
//!   scrypt). Mode 0600.
//! - `ADIR/authority.pub`: the public part (CBOR of [`AuthorityPublic`]): deployment id and name, the
//!   authority's key and age recipient. `musubi-node init` copies what the relay needs from it.
//! - `ADIR/invites/<invite id>.age`: each new-facility invite's secret, name and role, age-encrypted
//!   to the authority's own recipient (so issuing an invite needs no passphrase, and approving one
//!   needs the key). Moved to `ADIR/invites/used/` once approved.
//!
//! Approving ([`Authority::approve`]) checks the joining device's proof of the invite's secret, and
//! signs the facility's certificate with the device as its root key; it also seals to the device the
//! pseudonym keys of the sectors the facility's role works in (HMAC keys of card pseudonyms, DESIGN
//! invariant 7: reception and HQ, clinics, staff cards; [`PseudonymKeys::for_role`]), so the relay
//! never holds one and a facility holds no other sector's key.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use musubi_crdt::crypto::{self, DeviceSecrets, PseudonymKeys};
use musubi_crdt::directory::{DeviceLink, FacilityCert, authority_fingerprint};
use musubi_crdt::ids::{DeploymentId, DeviceId, FacilityRole};
use musubi_crdt::invite::{
    INVITE_SECRET_BYTES, InviteId, JoinError, JoinRequest, facility_id_of_secret,
};
use serde::{Deserialize, Serialize};

/// The sealed key file inside `ADIR`.
pub const AUTHORITY_KEY_FILE: &str = "authority.age";
/// The public file inside `ADIR`.
pub const AUTHORITY_PUBLIC_FILE: &str = "authority.pub";
/// The directory of pending invites inside `ADIR`.
pub const INVITES_DIR: &str = "invites";
/// The scrypt work factor of the authority's passphrase (as for a device's, by default).
pub const AUTHORITY_SCRYPT_LOG_N: u8 = crypto::PASSPHRASE_LOG_N_DEFAULT;
/// The shortest passphrase accepted for the authority key, in characters.
pub const AUTHORITY_PASSPHRASE_CHARS_MIN: usize = crypto::PASSPHRASE_CHARS_MIN;

/// Errors of the authority directory.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// `authority init` found an existing authority.
    #[error("{} already holds a deployment authority; refusing to overwrite it", .0.display())]
    AlreadyInitialised(PathBuf),
    /// No authority in the directory.
    #[error("no deployment authority in {}: run `musubi-node authority init --authority {}` first (or check that the USB stick is mounted)", .0.display(), .0.display())]
    NotInitialised(PathBuf),
    /// The passphrase is too short.
    #[error(
        "the authority's passphrase must have at least {AUTHORITY_PASSPHRASE_CHARS_MIN} characters"
    )]
    WeakPassphrase,
    /// The passphrase does not open the key.
    #[error("wrong passphrase for the deployment authority's key (or the key file is damaged)")]
    WrongPassphrase,
    /// A file could not be read or written.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file does not decode.
    #[error("{} is damaged: {reason}", .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The join request does not verify against the invite.
    #[error("the join request is refused: {0}")]
    Join(#[from] JoinError),
    /// The invite expired before the device asked.
    #[error("the invite for {0:?} expired; issue a new one")]
    Expired(String),
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> AuthorityError + 'a {
    move |source| AuthorityError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn damaged(path: &Path, e: impl std::fmt::Display) -> AuthorityError {
    AuthorityError::Damaged {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AuthorityError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("write", path))
}

/// What anyone may know of the authority (`ADIR/authority.pub`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityPublic {
    /// Format version (1).
    pub v: u8,
    /// The deployment it certifies facilities for.
    pub deployment: DeploymentId,
    /// The deployment's name (for example the municipality).
    pub deployment_name: String,
    /// The authority's key, as a device id (a PeerId embedding the Ed25519 key).
    pub key: DeviceId,
    /// The authority's age recipient (pending invites are sealed to it).
    pub age_recipient: String,
}

impl AuthorityPublic {
    /// The fingerprint people compare (30 digits in six groups).
    pub fn fingerprint(&self) -> String {
        authority_fingerprint(&self.key)
    }
}

#[derive(Serialize, Deserialize)]
struct SealedKey {
    v: u8,
    #[serde(with = "serde_bytes")]
    signing_seed: [u8; 32],
    #[serde(with = "serde_bytes")]
    age_seed: [u8; 32],
    #[serde(with = "serde_bytes")]
    pseudonym_secret: [u8; 32],
}

/// A new-facility invite as the authority keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthorityInvite {
    /// The secret.
    #[serde(with = "serde_bytes")]
    pub secret: [u8; INVITE_SECRET_BYTES],
    /// The facility's name.
    pub name: String,
    /// Its role.
    pub role: FacilityRole,
    /// When it expires, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// What approving a new facility gives the relay to store.
#[derive(Clone, Debug)]
pub struct Approval {
    /// The facility's certificate.
    pub cert: FacilityCert,
    /// The first link of its device chain (from the join request).
    pub genesis: DeviceLink,
    /// The pseudonym keys of the facility's role ([`PseudonymKeys`]) sealed to the joining device.
    pub sealed_pseudonym: Vec<u8>,
}

/// The authority's directory, not unlocked.
#[derive(Clone, Debug)]
pub struct AuthorityDir {
    dir: PathBuf,
    public: AuthorityPublic,
}

/// The authority, unlocked with its passphrase.
pub struct Authority {
    dir: AuthorityDir,
    secrets: DeviceSecrets,
    pseudonym_secret: [u8; 32],
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authority({})", self.dir.public.key)
    }
}

impl AuthorityDir {
    /// Makes a new authority in `dir`: a key, a deployment id and a pseudonym secret from the OS
    /// random source, sealed with `passphrase`; the directory is made mode 0700.
    ///
    /// Errors: an existing authority, a passphrase shorter than [`AUTHORITY_PASSPHRASE_CHARS_MIN`],
    /// IO errors.
    pub fn init(
        dir: &Path,
        deployment_name: &str,
        passphrase: &str,
        log_n: u8,
    ) -> Result<Self, AuthorityError> {
        if passphrase.chars().count() < AUTHORITY_PASSPHRASE_CHARS_MIN {
            return Err(AuthorityError::WeakPassphrase);
        }
        let key_path = dir.join(AUTHORITY_KEY_FILE);
        if key_path.exists() || dir.join(AUTHORITY_PUBLIC_FILE).exists() {
            return Err(AuthorityError::AlreadyInitialised(dir.to_owned()));
        }
        fs::create_dir_all(dir.join(INVITES_DIR)).map_err(io("create", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io("set permissions of", dir))?;
        let secrets = DeviceSecrets::from_seeds(rand::random(), rand::random());
        let (signing_seed, age_seed) = secrets.to_seeds();
        let mut plain = Vec::new();
        ciborium::into_writer(
            &SealedKey {
                v: 1,
                signing_seed,
                age_seed,
                pseudonym_secret: rand::random(),
            },
            &mut plain,
        )
        .expect("writing to a Vec cannot fail");
        let sealed = crypto::seal_with_passphrase(&plain, passphrase, log_n)
            .map_err(|e| damaged(&key_path, e))?;
        plain.fill(0);
        let public = AuthorityPublic {
            v: 1,
            deployment: DeploymentId::from_random_bytes(rand::random()),
            deployment_name: deployment_name.to_owned(),
            key: secrets.device_id(),
            age_recipient: secrets.public().age_recipient,
        };
        let mut pub_bytes = Vec::new();
        ciborium::into_writer(&public, &mut pub_bytes).expect("writing to a Vec cannot fail");
        write_new(&key_path, &sealed, 0o600)?;
        write_new(&dir.join(AUTHORITY_PUBLIC_FILE), &pub_bytes, 0o644)?;
        Ok(Self {
            dir: dir.to_owned(),
            public,
        })
    }

    /// Opens the public part of the authority in `dir`.
    ///
    /// Errors: [`AuthorityError::NotInitialised`], a damaged file.
    pub fn open(dir: &Path) -> Result<Self, AuthorityError> {
        let path = dir.join(AUTHORITY_PUBLIC_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AuthorityError::NotInitialised(dir.to_owned()));
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        let public: AuthorityPublic =
            ciborium::from_reader(bytes.as_slice()).map_err(|e| damaged(&path, e))?;
        Ok(Self {
            dir: dir.to_owned(),
            public,
        })
    }

    /// The public part.
    pub fn public(&self) -> &AuthorityPublic {
        &self.public
    }

    /// Unlocks the key with the passphrase.
    ///
    /// Errors: [`AuthorityError::WrongPassphrase`], IO errors.
    pub fn unlock(self, passphrase: &str) -> Result<Authority, AuthorityError> {
        let path = self.dir.join(AUTHORITY_KEY_FILE);
        let sealed = fs::read(&path).map_err(io("read", &path))?;
        let mut plain = crypto::open_with_passphrase(&sealed, passphrase)
            .map_err(|_| AuthorityError::WrongPassphrase)?;
        let key: Result<SealedKey, _> = ciborium::from_reader(plain.as_slice());
        plain.fill(0);
        let key = key.map_err(|e| damaged(&path, e))?;
        let secrets = DeviceSecrets::from_seeds(key.signing_seed, key.age_seed);
        if secrets.device_id() != self.public.key {
            return Err(damaged(
                &path,
                "it holds another key than authority.pub names",
            ));
        }
        Ok(Authority {
            dir: self,
            secrets,
            pseudonym_secret: key.pseudonym_secret,
        })
    }

    /// Keeps a new-facility invite's secret, name and role, sealed to the authority (no passphrase
    /// needed). Returns the invite's id.
    ///
    /// Errors: IO errors.
    pub fn record_invite(&self, invite: &AuthorityInvite) -> Result<InviteId, AuthorityError> {
        let id = InviteId::of_secret(&invite.secret);
        let mut plain = Vec::new();
        ciborium::into_writer(invite, &mut plain).expect("writing to a Vec cannot fail");
        let recipient = crypto::parse_recipient(&self.public.age_recipient)
            .map_err(|e| damaged(&self.dir.join(AUTHORITY_PUBLIC_FILE), e))?;
        let sealed = crypto::seal_to(&[recipient], &plain)
            .map_err(|e| damaged(&self.dir.join(INVITES_DIR), e))?;
        plain.fill(0);
        let dir = self.dir.join(INVITES_DIR);
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        write_new(&dir.join(format!("{id}.age")), &sealed, 0o600)?;
        Ok(id)
    }
}

impl Authority {
    /// The public part.
    pub fn public(&self) -> &AuthorityPublic {
        &self.dir.public
    }

    /// The pending invite with this id, if the authority issued it and it was not approved yet.
    ///
    /// Errors: IO errors, a damaged invite file.
    pub fn invite(&self, id: InviteId) -> Result<Option<AuthorityInvite>, AuthorityError> {
        let path = self.dir.dir.join(INVITES_DIR).join(format!("{id}.age"));
        let sealed = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let plain = crypto::open_with(self.secrets.age_identity(), &sealed, 64 * 1024)
            .map_err(|e| damaged(&path, e))?;
        let invite: AuthorityInvite =
            ciborium::from_reader(plain.as_slice()).map_err(|e| damaged(&path, e))?;
        Ok(Some(invite))
    }

    /// Approves a join request for `invite` at `now_ms`: checks the proof and the first link, signs
    /// the facility's certificate with the joining device as its root (and the check value of the
    /// role's pseudonym keys), seals those keys to it.
    ///
    /// Errors: [`AuthorityError::Join`] when the request does not verify, [`AuthorityError::Expired`].
    pub fn approve(
        &self,
        request: &JoinRequest,
        invite: &AuthorityInvite,
        now_ms: u64,
    ) -> Result<Approval, AuthorityError> {
        if invite.expires_at_ms <= now_ms {
            return Err(AuthorityError::Expired(invite.name.clone()));
        }
        let facility = facility_id_of_secret(&invite.secret);
        request.verify(&invite.secret, Some(facility))?;
        let genesis = request.genesis.clone().ok_or(JoinError::BadGenesis)?;
        let keys = PseudonymKeys::for_role(&self.pseudonym_secret, invite.role);
        let cert = FacilityCert::sign(
            &self.secrets,
            self.dir.public.deployment,
            facility,
            &invite.name,
            invite.role,
            request.device.device,
            now_ms,
        )
        .with_pseudonym_check(&self.secrets, keys.check());
        let recipient = crypto::parse_recipient(&request.device.age_recipient)
            .map_err(|_| JoinError::BadRecipient)?;
        let sealed_pseudonym =
            crypto::seal_to(&[recipient], &keys.to_plain()).map_err(|_| JoinError::BadRecipient)?;
        Ok(Approval {
            cert,
            genesis,
            sealed_pseudonym,
        })
    }

    /// Marks an invite approved: its file moves to `invites/used/`, so it cannot be approved twice.
    ///
    /// Errors: IO errors.
    pub fn mark_used(&self, id: InviteId) -> Result<(), AuthorityError> {
        let dir = self.dir.dir.join(INVITES_DIR);
        let used = dir.join("used");
        fs::create_dir_all(&used).map_err(io("create", &used))?;
        let from = dir.join(format!("{id}.age"));
        fs::rename(&from, used.join(format!("{id}.age"))).map_err(io("move", &from))
    }

    /// The authority's signing secrets (for tests that certify in process).
    pub fn secrets(&self) -> &DeviceSecrets {
        &self.secrets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use musubi_crdt::crypto::PseudonymSector;
    use musubi_crdt::invite::{InviteCode, InviteFor};

    #[test]
    fn an_authority_approves_only_a_request_that_proves_its_invite() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let adir = tmp.path().join("authority");
        assert!(matches!(
            AuthorityDir::init(&adir, "柏崎市", "short", 10),
            Err(AuthorityError::WeakPassphrase)
        ));
        let dir = AuthorityDir::init(&adir, "柏崎市", "authority passphrase", 10).expect("init");
        let mode = fs::metadata(adir.join(AUTHORITY_KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let invite = AuthorityInvite {
            secret: [7; 32],
            name: "港診療所".into(),
            role: FacilityRole::Clinic,
            expires_at_ms: 10_000,
        };
        let id = dir.record_invite(&invite).expect("record");
        assert!(matches!(
            AuthorityDir::open(&adir)
                .expect("open")
                .unlock("wrong passphrase"),
            Err(AuthorityError::WrongPassphrase)
        ));
        let authority = AuthorityDir::open(&adir)
            .expect("open")
            .unlock("authority passphrase")
            .expect("unlock");
        let kept = authority.invite(id).expect("read").expect("kept");
        let code = InviteCode {
            deployment: dir.public().deployment,
            relay: authority.public().key,
            addrs: vec![],
            authority: authority.public().key,
            invite: InviteFor::NewFacility {
                name: kept.name.clone(),
                role: kept.role,
            },
            expires_at_ms: kept.expires_at_ms,
            secret: kept.secret.to_vec(),
        };
        let device = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let request = JoinRequest::make(&code, &device, "受付", 5);
        let approval = authority.approve(&request, &kept, 5).expect("approve");
        approval
            .cert
            .verify(&authority.public().key, dir.public().deployment)
            .expect("cert verifies");
        assert_eq!(approval.cert.root, device.device_id());
        assert_eq!(approval.cert.name, "港診療所");
        let opened = crypto::open_with(device.age_identity(), &approval.sealed_pseudonym, 1024)
            .expect("the device opens its pseudonym keys");
        let keys = PseudonymKeys::from_plain(&opened, FacilityRole::Clinic).expect("keys");
        assert_eq!(
            keys.sectors(),
            [PseudonymSector::Clinic, PseudonymSector::Staff],
            "a clinic gets the clinic and staff-card keys, not reception's"
        );
        assert!(
            !opened
                .windows(32)
                .any(|w| w == authority.pseudonym_secret.as_slice()),
            "the deployment's secret itself never leaves the authority"
        );
        let shelter = AuthorityInvite {
            secret: [9; 32],
            name: "七尾市立避難所".into(),
            role: FacilityRole::Shelter,
            expires_at_ms: 10_000,
        };
        let code = InviteCode {
            secret: shelter.secret.to_vec(),
            ..code.clone()
        };
        let other = DeviceSecrets::from_seeds([3; 32], [4; 32]);
        let approved = authority
            .approve(&JoinRequest::make(&code, &other, "受付", 5), &shelter, 5)
            .expect("approve the shelter");
        let shelter_keys = PseudonymKeys::from_plain(
            &crypto::open_with(other.age_identity(), &approved.sealed_pseudonym, 1024)
                .expect("open"),
            FacilityRole::Shelter,
        )
        .expect("keys");
        assert_eq!(
            shelter_keys.sectors(),
            [PseudonymSector::Reception, PseudonymSector::Staff]
        );
        assert_eq!(
            shelter_keys.key(PseudonymSector::Staff),
            keys.key(PseudonymSector::Staff),
            "staff cards have one id across the deployment"
        );

        let mut other = code.clone();
        other.secret = vec![8; 32];
        let guess = JoinRequest::make(&other, &device, "受付", 5);
        assert!(authority.approve(&guess, &kept, 5).is_err());
        assert!(matches!(
            authority.approve(&request, &kept, 10_000),
            Err(AuthorityError::Expired(_))
        ));
        authority.mark_used(id).expect("used");
        assert!(authority.invite(id).expect("read").is_none());
    }
}
