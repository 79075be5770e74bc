//! Contactless cards through a PC/SC reader (Suica and other FeliCa, MIFARE): the reader's
//! GET DATA `FF CA 00 00 00` gives the card's UID (IDm for FeliCa), which the engine hashes to a
//! pseudonymous id, as Noto's shelters used Suica in 2024.
//!
//! The reader answers for the card: a contact card, or a reader without the command, answers
//! `6A81` / `6D00` / `6E00`, and the card is then reported as unsupported.

use super::CardError;
use super::apdu::{Command, Transport, exchange};

/// Shortest UID accepted (ISO 14443 single-size UIDs are 4 bytes).
pub const UID_BYTES_MIN: usize = 4;
/// Longest UID accepted (FeliCa IDm is 8 bytes, ISO 14443 triple-size UIDs 10).
pub const UID_BYTES_MAX: usize = 10;

/// What GET DATA gave.
pub enum Uid {
    /// A stable UID (kept in memory only; hashed before it goes anywhere).
    Stable(Vec<u8>),
    /// A UID the card draws at random for every tap (ISO 14443 4-byte UIDs starting with `08`): it
    /// cannot identify anyone.
    Random,
    /// The reader or card does not give a UID.
    None,
}

/// Asks the reader for the UID.
pub fn read_uid(t: &mut dyn Transport) -> Result<Uid, CardError> {
    let r = exchange(t, &Command::get_uid())?;
    match r.sw {
        0x9000 if (UID_BYTES_MIN..=UID_BYTES_MAX).contains(&r.data.len()) => {
            if r.data.len() == 4 && r.data[0] == 0x08 {
                Ok(Uid::Random)
            } else {
                Ok(Uid::Stable(r.data))
            }
        }
        0x9000 => Err(CardError::Malformed(format!(
            "GET DATA (UID): a UID of {} bytes",
            r.data.len()
        ))),
        0x6A81 | 0x6D00 | 0x6E00 | 0x6A82 | 0x6A86 | 0x6981 | 0x6F00 | 0x6400 => Ok(Uid::None),
        sw => Err(CardError::status("GET DATA (UID)", sw)),
    }
}

/// The contactless technology a PC/SC reader names in the ATR it builds for a storage card
/// (PC/SC part 3: `3B 8F 80 01 80 4F 0C A0 00 00 03 06 SS NN NN ...`).
pub fn technology_from_atr(atr: &[u8]) -> Option<&'static str> {
    const RID: [u8; 5] = [0xA0, 0x00, 0x00, 0x03, 0x06];
    if atr.len() < 15 || atr[0] != 0x3B || atr[4] != 0x80 || atr[5] != 0x4F || atr[7..12] != RID {
        return None;
    }
    Some(match atr[12] {
        0x11 => "felica",
        0x03 => "mifare",
        0x01..=0x02 => "iso14443a",
        0x05..=0x07 => "iso14443b",
        0x09..=0x0B => "iso15693",
        _ => "contactless",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atr_technology() {
        let felica = [
            0x3B, 0x8F, 0x80, 0x01, 0x80, 0x4F, 0x0C, 0xA0, 0x00, 0x00, 0x03, 0x06, 0x11, 0x00,
            0x3B, 0, 0, 0, 0, 0x42,
        ];
        assert_eq!(technology_from_atr(&felica), Some("felica"));
        assert_eq!(technology_from_atr(&[0x3B, 0x00]), None);
    }
}
