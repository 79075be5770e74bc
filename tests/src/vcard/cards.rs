//! The emulated cards: a My Number card (JPKI AP with a user-authentication certificate from a test
//! CA made at start-up, 券面事項入力補助AP with its PIN and tries counter), FeliCa / MIFARE cards
//! answering the reader's GET DATA with their UID, a card that is neither, and misbehaviour
//! (mute, removed after N commands, a wrong status word for one instruction, T=0 framing).

use rsa::pkcs8::EncodePrivateKey;
use rsa::{Pkcs1v15Sign, RsaPrivateKey};

/// The JPKI AP.
pub const JPKI_AP: [u8; 10] = [0xD3, 0x92, 0xF0, 0x00, 0x26, 0x01, 0x00, 0x00, 0x00, 0x01];
/// The 券面事項入力補助AP.
pub const KENHOJO_AP: [u8; 10] = [0xD3, 0x92, 0x10, 0x00, 0x31, 0x00, 0x01, 0x01, 0x04, 0x08];
/// The 券面事項確認AP (present on real cards; nothing here reads it).
pub const KENKAKU_AP: [u8; 10] = [0xD3, 0x92, 0x10, 0x00, 0x31, 0x00, 0x01, 0x01, 0x04, 0x02];

/// What the card does with a command.
pub enum Answer {
    /// A response APDU.
    Reply(Vec<u8>),
    /// Nothing, ever (the reader waits).
    Mute,
    /// The card leaves the reader instead of answering.
    Remove,
}

/// The test CA that issues user-authentication certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn rsa_key() -> (RsaPrivateKey, rcgen::KeyPair) {
    let key =
        RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("generate an RSA-2048 key");
    let pkcs8 = key.to_pkcs8_der().expect("PKCS#8 of a fresh key");
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &pkcs8.as_bytes().into(),
        &rcgen::PKCS_RSA_SHA256,
    )
    .expect("rcgen takes an RSA-2048 PKCS#8 key");
    (key, kp)
}

impl TestCa {
    /// A new CA with a fresh RSA-2048 key ("JPKI test CA").
    pub fn generate() -> Self {
        let (_, key) = rsa_key();
        let mut params = rcgen::CertificateParams::new(vec![]).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CountryName, "JP");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "JPKI");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "Musubi test JPKI user-authentication CA",
        );
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self { cert, key }
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A user-authentication certificate for a new card key; returns (key, certificate DER, serial).
    fn issue(&self, expired: bool) -> (RsaPrivateKey, Vec<u8>, Vec<u8>) {
        let (key, kp) = rsa_key();
        let mut params = rcgen::CertificateParams::new(vec![]).expect("params");
        let serial: [u8; 8] = rand::random();
        let serial = [&[0x01][..], &serial].concat();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params
            .distinguished_name
            .push(rcgen::DnType::CountryName, "JP");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hex::encode_upper(&serial));
        if expired {
            params.not_before = rcgen::date_time_ymd(2015, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        } else {
            params.not_before = rcgen::date_time_ymd(2025, 1, 1);
            params.not_after = rcgen::date_time_ymd(2035, 12, 31);
        }
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params
            .signed_by(&kp, &self.cert, &self.key)
            .expect("issue a certificate");
        (key, cert.der().to_vec(), serial)
    }
}

/// A PIN and its tries counter.
#[derive(Clone, Debug)]
pub struct PinCounter {
    /// The PIN.
    pub pin: String,
    /// Tries left.
    pub tries: u8,
    /// Tries after a correct PIN.
    pub max: u8,
    /// Verified in this card session.
    pub verified: bool,
}

impl PinCounter {
    fn new(pin: &str) -> Self {
        Self {
            pin: pin.to_owned(),
            tries: 3,
            max: 3,
            verified: false,
        }
    }

    fn status(&self) -> Vec<u8> {
        if self.verified {
            vec![0x90, 0x00]
        } else if self.tries == 0 {
            vec![0x69, 0x83]
        } else {
            vec![0x63, 0xC0 | self.tries]
        }
    }

    fn verify(&mut self, given: &[u8]) -> Vec<u8> {
        if self.tries == 0 {
            return vec![0x69, 0x83];
        }
        if given == self.pin.as_bytes() {
            self.tries = self.max;
            self.verified = true;
            vec![0x90, 0x00]
        } else {
            self.tries -= 1;
            self.verified = false;
            vec![0x63, 0xC0 | self.tries]
        }
    }
}

/// A My Number card's files and counters.
pub struct MyNumber {
    key: RsaPrivateKey,
    cert: Vec<u8>,
    /// The certificate's serial number (what must never appear in the clear).
    pub serial: Vec<u8>,
    /// 利用者証明用 PIN.
    pub auth_pin: PinCounter,
    /// 券面事項入力補助用 PIN.
    pub kenhojo_pin: PinCounter,
    /// 氏名.
    pub name: String,
    /// 住所.
    pub address: String,
    /// 生年月日, YYYYMMDD.
    pub birth: String,
    /// 性別 code.
    pub sex: String,
    /// The 個人番号 (a made-up 12-digit number in EF 0001 of the 券面事項入力補助AP).
    pub my_number: String,
    df: Option<[u8; 10]>,
    ef: Option<[u8; 2]>,
}

impl MyNumber {
    fn new(ca: &TestCa, expired: bool) -> Self {
        let (key, cert, serial) = ca.issue(expired);
        Self {
            key,
            cert,
            serial,
            auth_pin: PinCounter::new("1234"),
            kenhojo_pin: PinCounter::new("1234"),
            name: "結 花子".into(),
            address: "石川県七尾市袖ケ江町イ部25番地".into(),
            birth: "19800401".into(),
            sex: "2".into(),
            my_number: "123456789018".into(),
            df: None,
            ef: None,
        }
    }

    /// DER of the certificate's SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        let (_, c) =
            x509_parser::parse_x509_certificate(&self.cert).expect("own certificate parses");
        c.public_key().raw.to_vec()
    }

    fn basic_four(&self) -> Vec<u8> {
        let field = |tag: [u8; 2], v: &[u8]| -> Vec<u8> {
            let mut out = tag.to_vec();
            if v.len() < 0x80 {
                out.push(v.len() as u8);
            } else {
                out.extend_from_slice(&[0x81, v.len() as u8]);
            }
            out.extend_from_slice(v);
            out
        };
        let inner = [
            field([0xDF, 0x21], &[0x00, 0x05, 0x00, 0x10, 0x00, 0x40]),
            field([0xDF, 0x22], self.name.as_bytes()),
            field([0xDF, 0x23], self.address.as_bytes()),
            field([0xDF, 0x24], self.birth.as_bytes()),
            field([0xDF, 0x25], self.sex.as_bytes()),
        ]
        .concat();
        let mut out = vec![0xFF, 0x20];
        if inner.len() < 0x80 {
            out.push(inner.len() as u8);
        } else if inner.len() < 0x100 {
            out.extend_from_slice(&[0x81, inner.len() as u8]);
        } else {
            out.extend_from_slice(&[0x82, (inner.len() >> 8) as u8, inner.len() as u8]);
        }
        out.extend_from_slice(&inner);
        out
    }

    /// Where the card is: `"jpki/000A"`, `"kenhojo/0001"` ...
    pub fn location(&self) -> String {
        let df = match self.df {
            Some(JPKI_AP) => "jpki",
            Some(KENHOJO_AP) => "kenhojo",
            Some(KENKAKU_AP) => "kenkaku",
            Some(_) => "other",
            None => "mf",
        };
        match self.ef {
            Some(ef) => format!("{df}/{}", hex::encode_upper(ef)),
            None => df.to_owned(),
        }
    }

    fn reset(&mut self) {
        self.df = None;
        self.ef = None;
        self.auth_pin.verified = false;
        self.kenhojo_pin.verified = false;
    }

    fn file(&self) -> Result<Vec<u8>, [u8; 2]> {
        match (self.df, self.ef) {
            (Some(JPKI_AP), Some([0x00, 0x0A])) => Ok(self.cert.clone()),
            (Some(JPKI_AP), Some([0x00, 0x0B])) => Ok(self.cert.clone()),
            (Some(JPKI_AP), Some([0x00, 0x01])) => Err([0x69, 0x82]),
            (Some(KENHOJO_AP), Some([0x00, 0x01])) if self.kenhojo_pin.verified => {
                let v = self.my_number.as_bytes();
                Ok([&[0xFF, 0x10, v.len() as u8][..], v].concat())
            }
            (Some(KENHOJO_AP), Some([0x00, 0x02])) if self.kenhojo_pin.verified => {
                Ok(self.basic_four())
            }
            (Some(KENHOJO_AP), Some(_)) => Err([0x69, 0x82]),
            (_, None) => Err([0x69, 0x86]),
            _ => Err([0x69, 0x82]),
        }
    }

    fn apdu(&mut self, c: &[u8], strict_le: bool) -> Vec<u8> {
        let (cla, ins, p1, p2) = (c[0], c[1], c[2], c[3]);
        let data: &[u8] = if c.len() > 5 {
            &c[5..(5 + c[4] as usize).min(c.len())]
        } else {
            &[]
        };
        match (cla, ins) {
            (0x00, 0xA4) if p1 == 0x04 => {
                let Ok(aid) = <[u8; 10]>::try_from(data) else {
                    return vec![0x6A, 0x82];
                };
                if ![JPKI_AP, KENHOJO_AP, KENKAKU_AP].contains(&aid) {
                    return vec![0x6A, 0x82];
                }
                if self.df != Some(aid) {
                    self.auth_pin.verified &= aid == JPKI_AP;
                    self.kenhojo_pin.verified &= aid == KENHOJO_AP;
                }
                self.df = Some(aid);
                self.ef = None;
                vec![0x90, 0x00]
            }
            (0x00, 0xA4) if p1 == 0x02 && data.len() == 2 && (p2 == 0x0C || p2 == 0x00) => {
                let fid = [data[0], data[1]];
                let known: &[[u8; 2]] = match self.df {
                    Some(JPKI_AP) => &[
                        [0, 0x01],
                        [0, 0x02],
                        [0, 0x0A],
                        [0, 0x0B],
                        [0, 0x17],
                        [0, 0x18],
                        [0, 0x1A],
                        [0, 0x1B],
                    ],
                    Some(KENHOJO_AP) => &[[0, 0x01], [0, 0x02], [0, 0x03], [0, 0x11]],
                    _ => &[],
                };
                if !known.contains(&fid) {
                    return vec![0x6A, 0x82];
                }
                self.ef = Some(fid);
                vec![0x90, 0x00]
            }
            (0x00, 0xA4) => vec![0x6A, 0x86],
            (0x00, 0xB0) => {
                let file = match self.file() {
                    Ok(f) => f,
                    Err(sw) => return sw.to_vec(),
                };
                let off = u16::from_be_bytes([p1 & 0x7F, p2]) as usize;
                let le = c.get(4).copied().filter(|_| c.len() == 5).unwrap_or(0);
                let want = if le == 0 { 256 } else { le as usize };
                if off >= file.len() {
                    return vec![0x6B, 0x00];
                }
                let left = file.len() - off;
                if want > left && strict_le {
                    return vec![0x6C, left as u8];
                }
                let end = off + want.min(left);
                let mut out = file[off..end].to_vec();
                out.extend_from_slice(if le != 0 && want > left {
                    &[0x62, 0x82]
                } else {
                    &[0x90, 0x00]
                });
                out
            }
            (0x00, 0x20) if p1 == 0x00 && p2 == 0x80 => {
                let pin = match (self.df, self.ef) {
                    (Some(JPKI_AP), Some([0x00, 0x18])) => &mut self.auth_pin,
                    (Some(KENHOJO_AP), Some([0x00, 0x11])) => &mut self.kenhojo_pin,
                    _ => return vec![0x69, 0x86],
                };
                if data.is_empty() {
                    pin.status()
                } else {
                    pin.verify(data)
                }
            }
            (0x80, 0x2A) if p1 == 0x00 && p2 == 0x80 => {
                if self.df != Some(JPKI_AP) || self.ef != Some([0x00, 0x17]) {
                    return vec![0x69, 0x86];
                }
                if !self.auth_pin.verified {
                    return vec![0x69, 0x82];
                }
                match self.key.sign(Pkcs1v15Sign::new_unprefixed(), data) {
                    Ok(mut sig) => {
                        sig.extend_from_slice(&[0x90, 0x00]);
                        sig
                    }
                    Err(_) => vec![0x6A, 0x80],
                }
            }
            (0xFF, 0xCA) => vec![0x6A, 0x81],
            (0x00, _) | (0x80, _) => vec![0x6D, 0x00],
            _ => vec![0x6E, 0x00],
        }
    }
}

/// What kind of card.
pub enum Kind {
    /// A My Number card.
    MyNumber(Box<MyNumber>),
    /// A FeliCa card (8-byte IDm).
    Felica([u8; 8]),
    /// A MIFARE card (7-byte UID).
    Mifare([u8; 7]),
    /// A MIFARE-like card drawing a random 4-byte UID (`08 ..`) at every tap.
    RandomUid,
    /// A contact card that is neither (no JPKI AP, no UID).
    Unsupported,
}

/// Transmission protocol the ATR announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// T=0 (data comes back through `61xx` / GET RESPONSE).
    T0,
    /// T=1.
    T1,
}

/// One emulated card with its behaviour switches.
pub struct Card {
    /// Its name in control commands and logs.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// T=0 or T=1.
    pub proto: Proto,
    /// Answers no command at all.
    pub mute: bool,
    /// Leaves the reader instead of answering the Nth command of an insertion (1-based).
    pub remove_after: Option<usize>,
    /// Answers this instruction byte with this status word.
    pub wrong_sw: Option<(u8, u16)>,
    /// Answers a READ BINARY asking for more than is left with `6Cxx` (else data + `6282`).
    pub strict_le: bool,
    /// Commands answered since the card was inserted.
    pub commands: usize,
    pending: Vec<u8>,
}

impl Card {
    /// A card of `kind` (`mynumber`, `felica`, `mifare`, `random-uid`, `unsupported`).
    pub fn new(name: &str, kind: &str, ca: &TestCa, expired: bool) -> Result<Self, String> {
        let seed: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(name.as_bytes()).into()
        };
        let kind = match kind {
            "mynumber" => Kind::MyNumber(Box::new(MyNumber::new(ca, expired))),
            "felica" => {
                let mut idm = [0u8; 8];
                idm.copy_from_slice(&seed[..8]);
                idm[0] = 0x01;
                idm[1] = 0x01;
                Kind::Felica(idm)
            }
            "mifare" => {
                let mut uid = [0u8; 7];
                uid.copy_from_slice(&seed[..7]);
                uid[0] = 0x04;
                Kind::Mifare(uid)
            }
            "random-uid" => Kind::RandomUid,
            "unsupported" => Kind::Unsupported,
            other => return Err(format!("unknown card kind {other:?}")),
        };
        Ok(Self {
            name: name.to_owned(),
            kind,
            proto: Proto::T1,
            mute: false,
            remove_after: None,
            wrong_sw: None,
            strict_le: false,
            commands: 0,
            pending: vec![],
        })
    }

    /// Sets `key=value` options: `proto=t0|t1`, `mute=0|1`, `remove_after=N`, `wrong_sw=INS:SW` (hex),
    /// `strict_le=0|1`, `pin=NNNN` (both PINs), `auth_pin=`, `kenhojo_pin=`, `auth_tries=`,
    /// `kenhojo_tries=`, `tries=` (both), `name=`, `address=`, `birth=YYYYMMDD`, `sex=1|2|...`,
    /// `idm=HEX16`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let flag = || matches!(value, "1" | "true" | "yes");
        let num = || {
            value
                .parse::<u8>()
                .map_err(|_| format!("{key}: not a number: {value}"))
        };
        match key {
            "proto" => {
                self.proto = if value.eq_ignore_ascii_case("t0") {
                    Proto::T0
                } else {
                    Proto::T1
                }
            }
            "mute" => self.mute = flag(),
            "strict_le" => self.strict_le = flag(),
            "remove_after" => {
                self.remove_after = match value {
                    "0" | "off" => None,
                    v => Some(
                        v.parse()
                            .map_err(|_| format!("remove_after: not a number: {v}"))?,
                    ),
                }
            }
            "wrong_sw" => {
                self.wrong_sw = match value.split_once(':') {
                    Some((ins, sw)) => Some((
                        u8::from_str_radix(ins, 16).map_err(|e| e.to_string())?,
                        u16::from_str_radix(sw, 16).map_err(|e| e.to_string())?,
                    )),
                    None if value == "off" => None,
                    None => return Err("wrong_sw=INS:SW (hex), e.g. B0:6F00".into()),
                }
            }
            "idm" => {
                let b = hex::decode(value).map_err(|e| e.to_string())?;
                match &mut self.kind {
                    Kind::Felica(idm) if b.len() == 8 => idm.copy_from_slice(&b),
                    _ => return Err("idm= needs a felica card and 16 hex digits".into()),
                }
            }
            _ => {
                let Kind::MyNumber(m) = &mut self.kind else {
                    return Err(format!("{key}= needs a mynumber card"));
                };
                match key {
                    "pin" => {
                        m.auth_pin.pin = value.into();
                        m.kenhojo_pin.pin = value.into();
                    }
                    "auth_pin" => m.auth_pin.pin = value.into(),
                    "kenhojo_pin" => m.kenhojo_pin.pin = value.into(),
                    "tries" => {
                        m.auth_pin.tries = num()?;
                        m.kenhojo_pin.tries = num()?;
                    }
                    "auth_tries" => m.auth_pin.tries = num()?,
                    "kenhojo_tries" => m.kenhojo_pin.tries = num()?,
                    "name" => m.name = value.into(),
                    "address" => m.address = value.into(),
                    "birth" => m.birth = value.into(),
                    "sex" => m.sex = value.into(),
                    other => return Err(format!("unknown option {other:?}")),
                }
            }
        }
        Ok(())
    }

    /// The ATR: a contact-style T=0 or T=1 ATR, or the PC/SC part 3 ATR a reader builds for a
    /// FeliCa / MIFARE storage card.
    pub fn atr(&self) -> Vec<u8> {
        let standard = match self.kind {
            Kind::Felica(_) => Some((0x11, [0x00, 0x3B])),
            Kind::Mifare(_) | Kind::RandomUid => Some((0x03, [0x00, 0x01])),
            _ => None,
        };
        if let Some((ss, nn)) = standard {
            let mut atr = vec![
                0x3B, 0x8F, 0x80, 0x01, 0x80, 0x4F, 0x0C, 0xA0, 0x00, 0x00, 0x03, 0x06, ss, nn[0],
                nn[1], 0, 0, 0, 0,
            ];
            let tck = atr[1..].iter().fold(0u8, |a, b| a ^ b);
            atr.push(tck);
            return atr;
        }
        // Historical bytes "MUSUBI-VC".
        let hist = b"MUSUBI-VC";
        match self.proto {
            // TS, T0 (no interface bytes, K historical bytes): T=0 implied, no TCK.
            Proto::T0 => [&[0x3B, hist.len() as u8][..], hist].concat(),
            Proto::T1 => {
                // TS, T0 (TD1 present), TD1 (TD2 present, T=1), TD2 (T=1), historical bytes, TCK.
                let mut atr = [&[0x3B, 0x80 | hist.len() as u8, 0x81, 0x01][..], hist].concat();
                let tck = atr[1..].iter().fold(0u8, |a, b| a ^ b);
                atr.push(tck);
                atr
            }
        }
    }

    /// Power on, off or reset: the session state goes (selected files, verified PINs).
    pub fn reset(&mut self) {
        self.pending.clear();
        if let Kind::MyNumber(m) = &mut self.kind {
            m.reset();
        }
    }

    /// Where a My Number card is (`jpki/000A`, ...), for the log.
    pub fn location(&self) -> Option<String> {
        match &self.kind {
            Kind::MyNumber(m) => Some(m.location()),
            _ => None,
        }
    }

    /// Answers one command APDU.
    pub fn apdu(&mut self, c: &[u8]) -> Answer {
        self.commands += 1;
        if self.mute {
            return Answer::Mute;
        }
        if self.remove_after.is_some_and(|n| self.commands >= n) {
            return Answer::Remove;
        }
        if c.len() < 4 {
            return Answer::Reply(vec![0x67, 0x00]);
        }
        if let Some((ins, sw)) = self.wrong_sw
            && c[1] == ins
        {
            return Answer::Reply(sw.to_be_bytes().to_vec());
        }
        // T=0: GET RESPONSE hands out what a 61xx announced.
        if self.proto == Proto::T0 && c[0] == 0x00 && c[1] == 0xC0 {
            if self.pending.is_empty() {
                return Answer::Reply(vec![0x6F, 0x00]);
            }
            let le = c.get(4).copied().unwrap_or(0) as usize;
            let n = self.pending.len().min(256);
            if le != n % 256 {
                return Answer::Reply(vec![0x6C, n as u8]);
            }
            let mut out: Vec<u8> = self.pending.drain(..n).collect();
            if self.pending.is_empty() {
                out.extend_from_slice(&[0x90, 0x00]);
            } else {
                out.extend_from_slice(&[0x61, self.pending.len().min(256) as u8]);
            }
            return Answer::Reply(out);
        }
        self.pending.clear();
        let strict = self.strict_le;
        let r = match &mut self.kind {
            Kind::MyNumber(m) => m.apdu(c, strict),
            Kind::Felica(idm) => uid_answer(c, idm),
            Kind::Mifare(uid) => uid_answer(c, uid),
            Kind::RandomUid => {
                let mut uid: [u8; 4] = rand::random();
                uid[0] = 0x08;
                uid_answer(c, &uid)
            }
            Kind::Unsupported => {
                if c[0] == 0xFF {
                    vec![0x6A, 0x81]
                } else if c[1] == 0xA4 {
                    vec![0x6A, 0x82]
                } else {
                    vec![0x6D, 0x00]
                }
            }
        };
        // T=0 cards do not send data with the first response: they announce it with 61xx.
        if self.proto == Proto::T0 && r.len() > 2 && c[0] != 0xFF {
            let (data, sw) = r.split_at(r.len() - 2);
            if sw == [0x90, 0x00] {
                self.pending = data.to_vec();
                return Answer::Reply(vec![0x61, data.len().min(256) as u8]);
            }
        }
        Answer::Reply(r)
    }
}

/// How a PC/SC reader answers for a storage card: GET DATA gives the UID, everything else is refused.
fn uid_answer(c: &[u8], uid: &[u8]) -> Vec<u8> {
    match (c[0], c[1], c[2]) {
        (0xFF, 0xCA, 0x00) => [uid, &[0x90, 0x00]].concat(),
        (0xFF, 0xCA, _) => vec![0x6A, 0x81],
        _ => vec![0x6A, 0x81],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t0_framing_and_files() {
        let ca = TestCa::generate();
        let mut c = Card::new("a", "mynumber", &ca, false).expect("card");
        c.set("proto", "t0").expect("set");
        let Answer::Reply(r) = c.apdu(&[
            0x00, 0xA4, 0x04, 0x0C, 0x0A, 0xD3, 0x92, 0xF0, 0x00, 0x26, 0x01, 0x00, 0x00, 0x00,
            0x01,
        ]) else {
            panic!("reply")
        };
        assert_eq!(r, vec![0x90, 0x00]);
        let Answer::Reply(_) = c.apdu(&[0x00, 0xA4, 0x02, 0x0C, 0x02, 0x00, 0x0A]) else {
            panic!("reply")
        };
        let Answer::Reply(r) = c.apdu(&[0x00, 0xB0, 0x00, 0x00, 0x04]) else {
            panic!("reply")
        };
        assert_eq!(r, vec![0x61, 0x04]);
        let Answer::Reply(r) = c.apdu(&[0x00, 0xC0, 0x00, 0x00, 0x04]) else {
            panic!("reply")
        };
        assert_eq!(r[0], 0x30);
        assert_eq!(&r[4..], &[0x90, 0x00]);
    }
}
