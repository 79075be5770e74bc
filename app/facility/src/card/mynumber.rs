//! The My Number card (個人番号カード): the JPKI AP's user-authentication certificate and key, and the
//! 券面事項入力補助AP's four attributes.
//!
//! What this module may touch is a closed set, [`Ef`]: the user-authentication certificate, PIN and
//! key of the JPKI AP, and the PIN and basic-four-attributes file of the 券面事項入力補助AP.
//! EF 0001 of the 券面事項入力補助AP (the 個人番号, DESIGN invariant 7) is not in it, and no function
//! here takes a file id from outside, so no caller can make this module select it.
//!
//! APDU sequences (short APDUs; `..` is the chunked READ BINARY of [`super::apdu::read_binary_all`]):
//! - identity, no PIN: `00A4040C 0A D392F000260100000001` (JPKI AP), `00A4020C 02 000A`, `00B0 ..`
//! - tries left: `00A4020C 02 0018`, `00200080` → `63Cx` (x tries left)
//! - possession: `00200080 04 <PIN>`, `00A4020C 02 0017`, `802A0080 33 <DigestInfo SHA-256> 00`
//! - attributes: `00A4040C 0A D3921000310001010408`, `00A4020C 02 0011`, `00200080`,
//!   `00200080 04 <PIN>`, `00A4020C 02 0002`, `00B0 ..`

use rsa::pkcs8::DecodePublicKey;
use rsa::{Pkcs1v15Sign, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::CardError;
use super::apdu::{self, Command, Transport, exchange};

/// The JPKI application (公的個人認証 AP).
pub const JPKI_AP: [u8; 10] = [0xD3, 0x92, 0xF0, 0x00, 0x26, 0x01, 0x00, 0x00, 0x00, 0x01];
/// The 券面事項入力補助AP.
pub const KENHOJO_AP: [u8; 10] = [0xD3, 0x92, 0x10, 0x00, 0x31, 0x00, 0x01, 0x01, 0x04, 0x08];

/// Largest user-authentication certificate accepted, in bytes (JPKI's are about 1.4 KB).
pub const CERTIFICATE_BYTES_MAX: usize = 4096;
/// Largest basic-four-attributes file accepted, in bytes.
pub const BASIC_FOUR_BYTES_MAX: usize = 2048;
/// Digits of both PINs this module sends (利用者証明用 and 券面事項入力補助用 are 4 digits).
pub const PIN_DIGITS: usize = 4;

/// DER prefix of a SHA-256 DigestInfo (RFC 8017 §9.2 note 1).
const SHA256_DIGEST_INFO_PREFIX: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0D, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// The applications this module selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum App {
    Jpki,
    Kenhojo,
}

/// Every elementary file this module can select: a closed set without the 個人番号 (EF 0001 of the
/// 券面事項入力補助AP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ef {
    /// JPKI AP: 利用者証明用電子証明書 (readable without PIN).
    AuthCertificate,
    /// JPKI AP: 利用者証明用 PIN.
    AuthPin,
    /// JPKI AP: 利用者証明用 private key.
    AuthKey,
    /// 券面事項入力補助AP: its PIN.
    KenhojoPin,
    /// 券面事項入力補助AP: 基本4情報 (氏名, 住所, 生年月日, 性別).
    KenhojoBasicFour,
}

impl Ef {
    #[cfg(test)]
    const ALL: [Ef; 5] = [
        Ef::AuthCertificate,
        Ef::AuthPin,
        Ef::AuthKey,
        Ef::KenhojoPin,
        Ef::KenhojoBasicFour,
    ];

    fn app(self) -> App {
        match self {
            Ef::AuthCertificate | Ef::AuthPin | Ef::AuthKey => App::Jpki,
            Ef::KenhojoPin | Ef::KenhojoBasicFour => App::Kenhojo,
        }
    }

    fn fid(self) -> [u8; 2] {
        match self {
            Ef::AuthCertificate => [0x00, 0x0A],
            Ef::AuthPin => [0x00, 0x18],
            Ef::AuthKey => [0x00, 0x17],
            Ef::KenhojoPin => [0x00, 0x11],
            Ef::KenhojoBasicFour => [0x00, 0x02],
        }
    }

    fn command_name(self) -> &'static str {
        match self {
            Ef::AuthCertificate => "SELECT EF 000A (user-authentication certificate)",
            Ef::AuthPin => "SELECT EF 0018 (user-authentication PIN)",
            Ef::AuthKey => "SELECT EF 0017 (user-authentication key)",
            Ef::KenhojoPin => "SELECT EF 0011 (券面事項入力補助 PIN)",
            Ef::KenhojoBasicFour => "SELECT EF 0002 (基本4情報)",
        }
    }
}

/// Which PIN of the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinKind {
    /// 利用者証明用電子証明書の暗証番号 (JPKI user authentication, 4 digits).
    UserAuthentication,
    /// 券面事項入力補助用の暗証番号 (4 digits).
    Kenhojo,
}

impl PinKind {
    /// The name residents know it by.
    pub fn label_ja(self) -> &'static str {
        match self {
            PinKind::UserAuthentication => "利用者証明用電子証明書の暗証番号（数字4桁）",
            PinKind::Kenhojo => "券面事項入力補助用の暗証番号（数字4桁）",
        }
    }

    /// The same in English.
    pub fn label_en(self) -> &'static str {
        match self {
            PinKind::UserAuthentication => "user-authentication certificate PIN (4 digits)",
            PinKind::Kenhojo => "form-filling (券面事項入力補助) PIN (4 digits)",
        }
    }

    fn ef(self) -> Ef {
        match self {
            PinKind::UserAuthentication => Ef::AuthPin,
            PinKind::Kenhojo => Ef::KenhojoPin,
        }
    }
}

/// A PIN as typed by the resident: four ASCII digits, wiped from memory when dropped.
pub struct Pin(Zeroizing<Vec<u8>>);

impl Pin {
    /// Checks the format (exactly [`PIN_DIGITS`] digits) without touching any card.
    pub fn new(text: &str) -> Result<Self, CardError> {
        let t = text.trim();
        if t.len() != PIN_DIGITS || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CardError::PinFormat);
        }
        Ok(Self(Zeroizing::new(t.as_bytes().to_vec())))
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(****)")
    }
}

/// The user-authentication certificate, as read (public data; kept in memory only).
pub struct AuthCertificate {
    /// DER of the certificate's SubjectPublicKeyInfo: what the pseudonymous id is derived from.
    pub(crate) spki_der: Vec<u8>,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
}

impl std::fmt::Debug for AuthCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCertificate")
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

/// 性別 as the card codes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    /// Code 1 (男).
    Male,
    /// Code 2 (女).
    Female,
    /// Any other code.
    Other,
}

/// The four attributes of the 券面事項入力補助AP (read only with the resident's consent and PIN).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attributes {
    /// 氏名.
    pub name: String,
    /// 住所.
    pub address: String,
    /// 生年月日, `YYYY-MM-DD`.
    pub birth_date: String,
    /// 性別.
    pub sex: Sex,
}

impl std::fmt::Debug for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attributes(<personal data>)")
    }
}

/// The card of the session, tracking which application is selected.
pub struct MyNumberCard<'t> {
    t: &'t mut dyn Transport,
    app: Option<App>,
}

impl<'t> MyNumberCard<'t> {
    /// Selects the JPKI AP: `Ok(Some(card))` on a My Number card, `Ok(None)` when the card has no JPKI AP.
    pub fn detect(t: &'t mut dyn Transport) -> Result<Option<Self>, CardError> {
        let r = exchange(t, &Command::select_df("SELECT JPKI AP", &JPKI_AP))?;
        match r.sw {
            0x9000 => Ok(Some(Self {
                t,
                app: Some(App::Jpki),
            })),
            // Not found, or a contactless reader / card that does not do ISO SELECT.
            0x6A82 | 0x6A81 | 0x6A86 | 0x6D00 | 0x6E00 | 0x6F00 | 0x6985 | 0x6999 => Ok(None),
            sw => Err(CardError::status("SELECT JPKI AP", sw)),
        }
    }

    fn select_app(&mut self, app: App) -> Result<(), CardError> {
        if self.app == Some(app) {
            return Ok(());
        }
        self.app = None;
        let (name, aid) = match app {
            App::Jpki => ("SELECT JPKI AP", &JPKI_AP),
            App::Kenhojo => ("SELECT 券面事項入力補助AP", &KENHOJO_AP),
        };
        exchange(self.t, &Command::select_df(name, aid))?.check(name)?;
        self.app = Some(app);
        Ok(())
    }

    fn select(&mut self, ef: Ef) -> Result<(), CardError> {
        self.select_app(ef.app())?;
        exchange(self.t, &Command::select_ef(ef.command_name(), ef.fid()))?
            .check(ef.command_name())?;
        Ok(())
    }

    /// Reads the user-authentication certificate (no PIN).
    pub fn auth_certificate(&mut self) -> Result<AuthCertificate, CardError> {
        self.select(Ef::AuthCertificate)?;
        let der = apdu::read_binary_all(
            self.t,
            "READ BINARY (user-authentication certificate)",
            CERTIFICATE_BYTES_MAX,
            apdu::tlv_length,
        )?;
        parse_certificate(&der)
    }

    /// Tries left for `which` PIN (VERIFY without data: nothing is sent that could count as a try).
    pub fn pin_tries(&mut self, which: PinKind) -> Result<PinTries, CardError> {
        self.select(which.ef())?;
        let r = exchange(self.t, &Command::verify_status("VERIFY (tries left)"))?;
        match r.sw {
            0x9000 => Ok(PinTries::AlreadyVerified),
            0x6983 | 0x63C0 => Err(CardError::PinBlocked { which }),
            sw if sw & 0xFFF0 == 0x63C0 => Ok(PinTries::Left((sw & 0x0F) as u8)),
            sw => Err(CardError::status("VERIFY (tries left)", sw)),
        }
    }

    /// Verifies `which` PIN once: reads the tries left, shows them to `prompt`, refuses on the last try
    /// unless `confirm_last_try`, sends the PIN `prompt` gives, and never sends it again on failure.
    pub fn verify_pin(
        &mut self,
        which: PinKind,
        prompt: &mut dyn PinPrompt,
        confirm_last_try: bool,
    ) -> Result<(), CardError> {
        let tries = match self.pin_tries(which)? {
            PinTries::AlreadyVerified => return Ok(()),
            PinTries::Left(n) => n,
        };
        if tries == 1 && !confirm_last_try {
            return Err(CardError::LastTry { which });
        }
        let pin = prompt.pin(which, tries).ok_or(CardError::PinNotGiven {
            which,
            tries_left: tries,
        })?;
        // pin_tries left the PIN's EF selected.
        let r = exchange(self.t, &Command::verify("VERIFY", &pin.0))?;
        drop(pin);
        match r.sw {
            0x9000 => Ok(()),
            0x6983 | 0x63C0 => Err(CardError::PinBlocked { which }),
            sw if sw & 0xFFF0 == 0x63C0 => Err(CardError::WrongPin {
                which,
                tries_left: (sw & 0x0F) as u8,
            }),
            sw => Err(CardError::status("VERIFY", sw)),
        }
    }

    /// Has the card sign `challenge` with the user-authentication key and checks the signature against
    /// `cert`. The user-authentication PIN must be verified first.
    pub fn prove_possession(
        &mut self,
        cert: &AuthCertificate,
        challenge: &[u8],
    ) -> Result<(), CardError> {
        let digest = Sha256::digest(challenge);
        let digest_info = [&SHA256_DIGEST_INFO_PREFIX[..], &digest[..]].concat();
        self.select(Ef::AuthKey)?;
        let name = "COMPUTE DIGITAL SIGNATURE";
        let sig = exchange(
            self.t,
            &Command::proprietary(name, [0x80, 0x2A, 0x00, 0x80], digest_info.clone(), 0),
        )?
        .check(name)?;
        let key = RsaPublicKey::from_public_key_der(&cert.spki_der).map_err(|e| {
            CardError::Certificate(format!("the certificate's key is not RSA: {e}"))
        })?;
        // The DigestInfo is spelled out above, so the padding is checked against it as it is.
        key.verify(Pkcs1v15Sign::new_unprefixed(), &digest_info, &sig.data)
            .map_err(|_| CardError::SignatureInvalid)
    }

    /// Reads 氏名, 住所, 生年月日, 性別 (the 券面事項入力補助 PIN must be verified first).
    pub fn basic_four(&mut self) -> Result<Attributes, CardError> {
        self.select(Ef::KenhojoBasicFour)?;
        let raw = Zeroizing::new(apdu::read_binary_all(
            self.t,
            "READ BINARY (基本4情報)",
            BASIC_FOUR_BYTES_MAX,
            apdu::tlv_length,
        )?);
        parse_basic_four(&raw)
    }
}

/// The PIN counter as VERIFY without data reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinTries {
    /// Already verified in this card session.
    AlreadyVerified,
    /// Tries left before the card locks the PIN.
    Left(u8),
}

/// Asks the person at the desk for a PIN, showing how many tries are left.
pub trait PinPrompt {
    /// The PIN for `which`, or `None` when the person declines (nothing is sent then).
    fn pin(&mut self, which: PinKind, tries_left: u8) -> Option<Pin>;
}

impl<F: FnMut(PinKind, u8) -> Option<Pin>> PinPrompt for F {
    fn pin(&mut self, which: PinKind, tries_left: u8) -> Option<Pin> {
        self(which, tries_left)
    }
}

/// Parses the certificate's SubjectPublicKeyInfo and expiry.
fn parse_certificate(der: &[u8]) -> Result<AuthCertificate, CardError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
        CardError::Certificate(format!(
            "the user-authentication certificate does not parse: {e}"
        ))
    })?;
    Ok(AuthCertificate {
        spki_der: cert.public_key().raw.to_vec(),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// Walks BER-TLV elements (tags of up to 4 bytes, read big-endian): `(tag, value)` pairs.
/// Errors: [`CardError::Malformed`] for a truncated or malformed element; never panics, whatever
/// the card sends.
fn tlv_elements(mut bytes: &[u8]) -> Result<Vec<(u32, &[u8])>, CardError> {
    let bad = || CardError::Malformed("基本4情報: a damaged TLV element".into());
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes[0] == 0x00 || bytes[0] == 0xFF && bytes.len() == 1 {
            break; // padding
        }
        let h = apdu::tlv_header(bytes).ok_or_else(bad)?;
        let total = h.header.checked_add(h.value).ok_or_else(bad)?;
        if total > bytes.len() {
            return Err(bad());
        }
        let tag = bytes[..h.tag]
            .iter()
            .fold(0u32, |t, b| (t << 8) | u32::from(*b));
        out.push((tag, &bytes[h.header..total]));
        bytes = &bytes[total..];
    }
    Ok(out)
}

/// Parses EF 0002: `FF20 { DF21 header, DF22 氏名, DF23 住所, DF24 生年月日 (YYYYMMDD), DF25 性別 }`.
fn parse_basic_four(raw: &[u8]) -> Result<Attributes, CardError> {
    let outer = tlv_elements(raw)?;
    let inner = match outer.first() {
        Some((0xFF20, v)) => tlv_elements(v)?,
        _ => return Err(CardError::Malformed("基本4情報: no FF20 element".into())),
    };
    let text = |tag: u32, what: &str| -> Result<String, CardError> {
        let v = inner
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| *v)
            .ok_or_else(|| CardError::Malformed(format!("基本4情報: no {what}")))?;
        String::from_utf8(v.to_vec())
            .map_err(|_| CardError::Malformed(format!("基本4情報: {what} is not UTF-8")))
    };
    let name = text(0xDF22, "氏名")?;
    let address = text(0xDF23, "住所")?;
    let birth = text(0xDF24, "生年月日")?;
    let sex = text(0xDF25, "性別")?;
    if birth.len() != 8 || !birth.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CardError::Malformed(
            "基本4情報: 生年月日 is not YYYYMMDD".into(),
        ));
    }
    Ok(Attributes {
        name,
        address,
        birth_date: format!("{}-{}-{}", &birth[..4], &birth[4..6], &birth[6..]),
        sex: match sex.trim() {
            "1" => Sex::Male,
            "2" => Sex::Female,
            _ => Sex::Other,
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::card::apdu::Protocol;

    #[test]
    fn the_closed_set_of_files_has_no_individual_number() {
        for ef in Ef::ALL {
            assert!(
                !(ef.app() == App::Kenhojo && ef.fid() == [0x00, 0x01]),
                "{ef:?} would select the 個人番号 (EF 0001 of the 券面事項入力補助AP)"
            );
        }
    }

    #[test]
    fn pins_are_four_digits_checked_before_any_card_sees_them() {
        assert!(Pin::new("1234").is_ok());
        assert!(Pin::new(" 1234\n").is_ok());
        for bad in ["123", "12345", "12a4", "", "１２３４"] {
            assert!(
                matches!(Pin::new(bad), Err(CardError::PinFormat)),
                "{bad:?}"
            );
        }
        assert_eq!(
            format!("{:?}", Pin::new("1234").expect("valid")),
            "Pin(****)"
        );
    }

    #[test]
    fn basic_four_parses() {
        let field = |tag: u16, v: &[u8]| [&tag.to_be_bytes()[..], &[v.len() as u8], v].concat();
        let inner = [
            field(0xDF21, &[0, 1, 2]),
            field(0xDF22, "山田 花子".as_bytes()),
            field(0xDF23, "石川県七尾市袖ケ江町イ部25番地".as_bytes()),
            field(0xDF24, b"19800401"),
            field(0xDF25, b"2"),
        ]
        .concat();
        let raw = [&[0xFF, 0x20, 0x81, inner.len() as u8][..], &inner].concat();
        let a = parse_basic_four(&raw).expect("parses");
        assert_eq!(a.name, "山田 花子");
        assert_eq!(a.birth_date, "1980-04-01");
        assert_eq!(a.sex, Sex::Female);
        assert_eq!(format!("{a:?}"), "Attributes(<personal data>)");
    }

    /// A card that answers EF 0002 with tags of three and four bytes (seen from a hostile card):
    /// refused with a sentence, never a panic.
    #[test]
    fn long_tags_and_damaged_lengths_are_refused_not_panicked_on() {
        for raw in [
            &[0xFF, 0xA0, 0x81, 0x05, 0x00][..],
            &[0xFF, 0xA0, 0xA0, 0x01, 0x82, 0x00, 0x01, 0x00][..],
            &[0xDF, 0xA2, 0x83, 0x00][..],
            &[0xDF, 0xA2, 0x83, 0x00, 0x00][..],
            &[0xFF, 0x20, 0x07, 0xDF, 0xA2, 0x83, 0x00, 0x00, 0x00, 0x00][..],
            &[0xFF, 0x20, 0x83, 0xFF, 0xFF, 0xFF][..],
            &[0xFF, 0x20, 0x84, 0x00, 0x00, 0x00, 0x01][..],
            &[0x1F][..],
        ] {
            assert!(
                matches!(parse_basic_four(raw), Err(CardError::Malformed(_))),
                "{raw:02X?}"
            );
        }
        // A four-byte tag with a value is read as one element.
        let el = tlv_elements(&[0x1F, 0x81, 0x82, 0x03, 0x01, 0xAA]).expect("an element");
        assert_eq!(el, vec![(0x1F81_8203, &[0xAA][..])]);
    }

    proptest::proptest! {
        /// Whatever a card answers, the TLV walk and the 基本4情報 parser return, never panic.
        /// (proptest prints the failing input and keeps it in proptest-regressions/.)
        #[test]
        fn arbitrary_card_answers_never_panic_the_parsers(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)
        ) {
            let _ = tlv_elements(&raw);
            let _ = parse_basic_four(&raw);
            let mut wrapped = vec![0xFF, 0x20, 0x81, raw.len().min(255) as u8];
            wrapped.extend_from_slice(&raw[..raw.len().min(255)]);
            let _ = parse_basic_four(&wrapped);
        }
    }

    /// A scripted My Number card: the files it has, PIN counters, and the log of every APDU.
    pub(crate) struct MockCard {
        pub(crate) log: Vec<Vec<u8>>,
        df: Option<[u8; 10]>,
        ef: Option<[u8; 2]>,
        pub(crate) tries: u8,
        pin: &'static [u8],
        verified: bool,
        cert: Vec<u8>,
    }

    impl MockCard {
        pub(crate) fn new(cert: Vec<u8>, tries: u8) -> Self {
            Self {
                log: vec![],
                df: None,
                ef: None,
                tries,
                pin: b"1234",
                verified: false,
                cert,
            }
        }
    }

    impl Transport for MockCard {
        fn transmit(&mut self, c: &[u8]) -> Result<Vec<u8>, CardError> {
            self.log.push(c.to_vec());
            let ok = |mut d: Vec<u8>| {
                d.extend_from_slice(&[0x90, 0x00]);
                Ok(d)
            };
            match (c[1], c[2]) {
                (0xA4, 0x04) => {
                    let aid: [u8; 10] = c[5..15].try_into().expect("10-byte AID");
                    self.df = Some(aid);
                    self.ef = None;
                    ok(vec![])
                }
                (0xA4, 0x02) => {
                    self.ef = Some([c[5], c[6]]);
                    ok(vec![])
                }
                (0xB0, _) => {
                    let off = u16::from_be_bytes([c[2], c[3]]) as usize;
                    let le = if c[4] == 0 { 256 } else { c[4] as usize };
                    let file: Vec<u8> = match (self.df, self.ef) {
                        (Some(JPKI_AP), Some([0x00, 0x0A])) => self.cert.clone(),
                        (Some(KENHOJO_AP), Some([0x00, 0x02])) if self.verified => {
                            let inner = [
                                &[0xDF, 0x22, 1][..],
                                b"A",
                                &[0xDF, 0x23, 1],
                                b"B",
                                &[0xDF, 0x24, 8],
                                b"20000101",
                                &[0xDF, 0x25, 1],
                                b"1",
                            ]
                            .concat();
                            [&[0xFF, 0x20, inner.len() as u8][..], &inner].concat()
                        }
                        _ => return Ok(vec![0x69, 0x82]),
                    };
                    let end = (off + le).min(file.len());
                    ok(file[off.min(end)..end].to_vec())
                }
                (0x20, _) if c.len() == 4 => Ok(if self.verified {
                    vec![0x90, 0x00]
                } else {
                    vec![0x63, 0xC0 | self.tries]
                }),
                (0x20, _) => {
                    if &c[5..] == self.pin {
                        self.verified = true;
                        ok(vec![])
                    } else {
                        self.tries = self.tries.saturating_sub(1);
                        Ok(vec![0x63, 0xC0 | self.tries])
                    }
                }
                _ => Ok(vec![0x6D, 0x00]),
            }
        }
        fn protocol(&self) -> Protocol {
            Protocol::T1
        }
    }

    /// Whether `apdu` selects EF 0001 while the 券面事項入力補助AP is the current DF.
    pub(crate) fn selects_individual_number(log: &[Vec<u8>]) -> bool {
        let mut df = None;
        for c in log {
            if c.len() >= 15 && c[1] == 0xA4 && c[2] == 0x04 {
                df = Some(c[5..15].to_vec());
            }
            if c.len() >= 7
                && c[1] == 0xA4
                && c[2] != 0x04
                && c[5..7] == [0x00, 0x01]
                && df.as_deref() == Some(&KENHOJO_AP[..])
            {
                return true;
            }
        }
        false
    }

    #[test]
    fn every_flow_leaves_the_individual_number_alone_and_sends_a_pin_once() {
        let cert = crate::card::tests::test_certificate();
        // Attributes with the right PIN.
        let mut card = MockCard::new(cert.clone(), 3);
        let mut m = MyNumberCard::detect(&mut card)
            .expect("detect")
            .expect("a My Number card");
        m.auth_certificate().expect("certificate");
        let mut prompt = |_: PinKind, _: u8| Pin::new("1234").ok();
        m.verify_pin(PinKind::Kenhojo, &mut prompt, false)
            .expect("pin");
        let a = m.basic_four().expect("attributes");
        assert_eq!(a.birth_date, "2000-01-01");
        assert!(!selects_individual_number(&card.log));
        assert_eq!(
            card.log
                .iter()
                .filter(|c| c[1] == 0x20 && c.len() > 4)
                .count(),
            1
        );

        // A wrong PIN: one VERIFY with data, then an error naming the tries left; no second attempt.
        let mut card = MockCard::new(cert.clone(), 3);
        let mut m = MyNumberCard::detect(&mut card)
            .expect("detect")
            .expect("a My Number card");
        let mut prompt = |_: PinKind, _: u8| Pin::new("9999").ok();
        let err = m
            .verify_pin(PinKind::Kenhojo, &mut prompt, false)
            .expect_err("wrong");
        assert!(
            matches!(err, CardError::WrongPin { tries_left: 2, .. }),
            "{err:?}"
        );
        assert_eq!(
            card.log
                .iter()
                .filter(|c| c[1] == 0x20 && c.len() > 4)
                .count(),
            1
        );
        assert!(!selects_individual_number(&card.log));

        // One try left: refused without confirmation, and nothing but the tries query went out.
        let mut card = MockCard::new(cert, 1);
        let mut m = MyNumberCard::detect(&mut card)
            .expect("detect")
            .expect("a My Number card");
        let mut asked = false;
        let mut prompt = |_: PinKind, _: u8| {
            asked = true;
            Pin::new("1234").ok()
        };
        let err = m
            .verify_pin(PinKind::Kenhojo, &mut prompt, false)
            .expect_err("refused");
        assert!(matches!(err, CardError::LastTry { .. }), "{err:?}");
        assert!(!asked, "the PIN is not even asked for");
        assert_eq!(
            card.log
                .iter()
                .filter(|c| c[1] == 0x20 && c.len() > 4)
                .count(),
            0
        );
    }
}
