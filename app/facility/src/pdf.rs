//! The care plan as a PDF: 第1表 居宅サービス計画書(1), 第2表 居宅サービス計画書(2) and 第3表 週間サービス計画表
//! in the layout of the MHLW standard forms (A4 landscape), drawn with a Japanese font of this system;
//! and the referral letter (診療情報提供書, 様式11) in the form's layout (A4 portrait, [`render_referral`]),
//! its sections flowing onto further pages when the text is long.
//!
//! The PDF is written with `krilla`, which embeds the font as a subset (only the glyphs used), so a
//! plan is tens of kilobytes even with a 6 MB font. Text is measured with `skrifa` (the font's own
//! advances) to wrap it inside the form's boxes; when a box is too small, the text shrinks down to
//! [`TEXT_PT_MIN`] and what still does not fit ends with `…` (the full text is in the document and the CSV).
//!
//! The font is a system file, found in this order: the file named by `MUSUBI_PDF_FONT`, then IPAex
//! Gothic (Debian `fonts-ipaexfont-gothic`), IPA Gothic (`fonts-ipafont-gothic`), Noto Sans CJK JP
//! (`fonts-noto-cjk`). Without any, [`find_font`] fails with [`PdfError::FontMissing`] naming the package to install.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use krilla::Document;
use krilla::color::luma;
use krilla::geom::{PathBuilder, Point, Rect};
use krilla::page::PageSettings;
use krilla::paint::{Fill, Stroke};
use krilla::surface::Surface;
use krilla::text::{Font, TextDirection};
use musubi_crdt::documents::careplan::{
    CareLevel, CarePlan, Certification, HouseworkReason, Sheet1, Weekday,
};
use musubi_crdt::documents::referral::ReferralLetter;
use skrifa::MetadataProvider;
use skrifa::instance::{LocationRef, Size};

/// Environment variable naming a TrueType/OpenType font file to use instead of the system's.
pub const FONT_ENV: &str = "MUSUBI_PDF_FONT";

/// Font files tried in order: (path, face index, Debian package that installs it).
pub const FONT_CANDIDATES: [(&str, u32, &str); 5] = [
    (
        "/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf",
        0,
        "fonts-ipaexfont-gothic",
    ),
    (
        "/usr/share/fonts/truetype/ipaexfont-gothic/ipaexg.ttf",
        0,
        "fonts-ipaexfont-gothic",
    ),
    (
        "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf",
        0,
        "fonts-ipafont-gothic",
    ),
    (
        "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
        0,
        "fonts-noto-cjk",
    ),
    (
        "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
        0,
        "fonts-noto-cjk",
    ),
];

/// Largest font file read, in bytes (Noto Sans CJK collections are about 20 MB).
pub const FONT_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Page width of A4 landscape, in points.
pub const PAGE_WIDTH_PT: f32 = 841.89;
/// Page height of A4 landscape, in points.
pub const PAGE_HEIGHT_PT: f32 = 595.28;
/// Smallest size text shrinks to inside a box, in points.
pub const TEXT_PT_MIN: f32 = 5.0;

const MARGIN: f32 = 30.0;
const LEFT: f32 = MARGIN;
const RIGHT: f32 = PAGE_WIDTH_PT - MARGIN;
const BOTTOM: f32 = PAGE_HEIGHT_PT - MARGIN;
const LINE_FACTOR: f32 = 1.3;

/// Why no PDF could be made.
#[derive(Debug, thiserror::Error)]
pub enum PdfError {
    /// No Japanese font was found; the message names the package to install.
    #[error(
        "no Japanese font to draw the PDF with (looked for {tried}); install one: `apt-get install fonts-ipaexfont-gothic` (or fonts-noto-cjk), or set {FONT_ENV} to a TrueType/OpenType font file"
    )]
    FontMissing {
        /// The files looked for, comma separated.
        tried: String,
    },
    /// A font file exists but cannot be used.
    #[error("{}: cannot use this font: {reason}", path.display())]
    FontUnusable {
        /// The font file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The PDF writer failed.
    #[error("could not write the PDF: {0}")]
    Render(String),
}

/// A Japanese font loaded from a file, with its advances cached for measuring text.
pub struct JapaneseFont {
    path: PathBuf,
    data: Arc<Vec<u8>>,
    index: u32,
    font: Font,
    /// Advance of each character at 1 pt.
    advances: RefCell<HashMap<char, f32>>,
}

impl JapaneseFont {
    /// Loads face `index` of the font file at `path` and checks that it has Japanese glyphs.
    ///
    /// # Errors
    ///
    /// [`PdfError::FontUnusable`] when the file cannot be read, is too large, is not a font, or has
    /// no glyph for 居.
    pub fn load(path: &Path, index: u32) -> Result<JapaneseFont, PdfError> {
        let unusable = |reason: String| PdfError::FontUnusable {
            path: path.to_owned(),
            reason,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| unusable(e.to_string()))?
            .len();
        if len > FONT_BYTES_MAX {
            return Err(unusable(format!(
                "{len} bytes, more than the {FONT_BYTES_MAX} read"
            )));
        }
        let data = Arc::new(std::fs::read(path).map_err(|e| unusable(e.to_string()))?);
        let face = skrifa::FontRef::from_index(&data, index)
            .map_err(|e| unusable(format!("not a TrueType/OpenType font ({e})")))?;
        if face.charmap().map('居').is_none() {
            return Err(unusable("it has no Japanese glyphs".to_owned()));
        }
        let font = Font::new(data.clone().into(), index)
            .ok_or_else(|| unusable("the PDF writer cannot read it".to_owned()))?;
        Ok(JapaneseFont {
            path: path.to_owned(),
            data,
            index,
            font,
            advances: RefCell::new(HashMap::new()),
        })
    }

    /// The font file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The width of `text` at `size` points.
    fn width(&self, text: &str, size: f32) -> f32 {
        let mut cache = self.advances.borrow_mut();
        let mut total = 0.0;
        let mut face = None;
        for c in text.chars() {
            let advance = match cache.get(&c) {
                Some(a) => *a,
                None => {
                    let face = face.get_or_insert_with(|| {
                        skrifa::FontRef::from_index(&self.data, self.index).ok()
                    });
                    let a = face
                        .as_ref()
                        .and_then(|f| {
                            let gid = f.charmap().map(c)?;
                            f.glyph_metrics(Size::new(1.0), LocationRef::default())
                                .advance_width(gid)
                        })
                        .unwrap_or(if c.is_ascii() { 0.5 } else { 1.0 });
                    cache.insert(c, a);
                    a
                }
            };
            total += advance;
        }
        total * size
    }
}

/// Finds a Japanese font: `MUSUBI_PDF_FONT`, then [`FONT_CANDIDATES`].
///
/// # Errors
///
/// [`PdfError::FontMissing`] when none exists; [`PdfError::FontUnusable`] when the one named by
/// `MUSUBI_PDF_FONT` cannot be used.
pub fn find_font() -> Result<JapaneseFont, PdfError> {
    if let Some(path) = std::env::var_os(FONT_ENV).filter(|p| !p.is_empty()) {
        return JapaneseFont::load(Path::new(&path), 0);
    }
    let mut tried = Vec::new();
    for (path, index, package) in FONT_CANDIDATES {
        let p = Path::new(path);
        if p.is_file()
            && let Ok(font) = JapaneseFont::load(p, index)
        {
            return Ok(font);
        }
        tried.push(format!("{path} ({package})"));
    }
    Err(PdfError::FontMissing {
        tried: tried.join(", "),
    })
}

/// Draws 第1表, 第2表 (as many pages as it needs) and 第3表 of `plan`.
///
/// # Errors
///
/// [`PdfError::Render`] when the PDF writer fails.
pub fn render(plan: &CarePlan, font: &JapaneseFont) -> Result<Vec<u8>, PdfError> {
    let mut document = Document::new();
    {
        let mut page = document.start_page_with(page_settings()?);
        let mut surface = page.surface();
        sheet1(&mut Pen::new(&mut surface, font), &plan.sheet1);
        surface.finish();
        page.finish();
    }
    let rows = sheet2_rows(plan, font);
    let mut start = 0;
    loop {
        let mut page = document.start_page_with(page_settings()?);
        let mut surface = page.surface();
        let next = sheet2_page(&mut Pen::new(&mut surface, font), plan, &rows, start);
        surface.finish();
        page.finish();
        if next >= rows.len() {
            break;
        }
        start = next;
    }
    {
        let mut page = document.start_page_with(page_settings()?);
        let mut surface = page.surface();
        sheet3(&mut Pen::new(&mut surface, font), plan);
        surface.finish();
        page.finish();
    }
    document
        .finish()
        .map_err(|e| PdfError::Render(format!("{e:?}")))
}

fn page_settings() -> Result<PageSettings, PdfError> {
    PageSettings::from_wh(PAGE_WIDTH_PT, PAGE_HEIGHT_PT)
        .ok_or_else(|| PdfError::Render("invalid page size".to_owned()))
}

// ---------------------------------------------------------------------------------------------
// Drawing primitives
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Align {
    Left,
    Center,
    Right,
}

struct Pen<'a, 'b> {
    surface: &'a mut Surface<'b>,
    font: &'a JapaneseFont,
}

impl<'a, 'b> Pen<'a, 'b> {
    fn new(surface: &'a mut Surface<'b>, font: &'a JapaneseFont) -> Self {
        Pen { surface, font }
    }

    fn width(&self, text: &str, size: f32) -> f32 {
        self.font.width(text, size)
    }

    /// Text with its baseline at `y`, anchored at `x` by `align`.
    fn text(&mut self, x: f32, y: f32, size: f32, text: &str, align: Align) {
        if text.is_empty() {
            return;
        }
        let w = self.width(text, size);
        let x = match align {
            Align::Left => x,
            Align::Center => x - w / 2.0,
            Align::Right => x - w,
        };
        self.surface.set_stroke(None);
        self.surface.set_fill(Some(Fill::default()));
        self.surface.draw_text(
            Point::from_xy(x, y),
            self.font.font.clone(),
            size,
            text,
            false,
            TextDirection::Auto,
        );
    }

    fn stroke(&mut self, path: Option<krilla::geom::Path>, width: f32) {
        let Some(path) = path else { return };
        self.surface.set_fill(None);
        self.surface.set_stroke(Some(Stroke {
            width,
            ..Stroke::default()
        }));
        self.surface.draw_path(&path);
    }

    fn line(&mut self, x1: f32, y1: f32, x2: f32, y2: f32, width: f32) {
        let mut pb = PathBuilder::new();
        pb.move_to(x1, y1);
        pb.line_to(x2, y2);
        self.stroke(pb.finish(), width);
    }

    fn rect(&mut self, x: f32, y: f32, w: f32, h: f32, width: f32) {
        let Some(r) = Rect::from_xywh(x, y, w, h) else {
            return;
        };
        let mut pb = PathBuilder::new();
        pb.push_rect(r);
        self.stroke(pb.finish(), width);
    }

    fn shade(&mut self, x: f32, y: f32, w: f32, h: f32, lightness: u8) {
        let Some(r) = Rect::from_xywh(x, y, w, h) else {
            return;
        };
        let mut pb = PathBuilder::new();
        pb.push_rect(r);
        let Some(path) = pb.finish() else { return };
        self.surface.set_stroke(None);
        self.surface.set_fill(Some(Fill {
            paint: luma::Color::new(lightness).into(),
            ..Fill::default()
        }));
        self.surface.draw_path(&path);
    }

    /// An ellipse around the box (x, y, w, h): the form's way of circling a choice.
    fn circle(&mut self, x: f32, y: f32, w: f32, h: f32) {
        let (cx, cy, rx, ry) = (x + w / 2.0, y + h / 2.0, w / 2.0, h / 2.0);
        let k = 0.552_284_8;
        let mut pb = PathBuilder::new();
        pb.move_to(cx + rx, cy);
        pb.cubic_to(cx + rx, cy + k * ry, cx + k * rx, cy + ry, cx, cy + ry);
        pb.cubic_to(cx - k * rx, cy + ry, cx - rx, cy + k * ry, cx - rx, cy);
        pb.cubic_to(cx - rx, cy - k * ry, cx - k * rx, cy - ry, cx, cy - ry);
        pb.cubic_to(cx + k * rx, cy - ry, cx + rx, cy - k * ry, cx + rx, cy);
        pb.close();
        self.stroke(pb.finish(), 0.8);
    }

    /// Lines of `text` wrapped to `width` at `size` (any character may break a Japanese line;
    /// closing punctuation hangs rather than starting a line).
    fn wrap(&self, text: &str, size: f32, width: f32) -> Vec<String> {
        wrap_with(|s| self.width(s, size), text, width)
    }

    /// `text` inside the box, wrapped, shrunk down to [`TEXT_PT_MIN`] if needed, cut with `…` if it
    /// still does not fit. Returns the height used.
    fn text_box(&mut self, x: f32, y: f32, w: f32, h: f32, size: f32, text: &str) -> f32 {
        let pad = 2.5;
        let (iw, ih) = (w - 2.0 * pad, h - 2.0 * pad);
        let mut size = size;
        let mut lines = self.wrap(text, size, iw);
        while lines.len() as f32 * size * LINE_FACTOR > ih && size > TEXT_PT_MIN {
            size = (size - 0.5).max(TEXT_PT_MIN);
            lines = self.wrap(text, size, iw);
        }
        let fit = ((ih / (size * LINE_FACTOR)).floor() as usize).max(1);
        if lines.len() > fit {
            lines.truncate(fit);
            if let Some(last) = lines.last_mut() {
                while !last.is_empty() && self.width(&format!("{last}…"), size) > iw {
                    last.pop();
                }
                last.push('…');
            }
        }
        for (i, line) in lines.iter().enumerate() {
            let baseline = y + pad + size + i as f32 * size * LINE_FACTOR;
            self.text(x + pad, baseline, size, line, Align::Left);
        }
        2.0 * pad + lines.len() as f32 * size * LINE_FACTOR
    }

    /// A label with an underlined value after it: `label value____`. Returns the x after the line.
    fn field(&mut self, x: f32, y: f32, label: &str, value: &str, line_width: f32) -> f32 {
        let size = 9.0;
        self.text(x, y, size, label, Align::Left);
        let vx = x + self.width(label, size) + 6.0;
        let mut vs = 10.0;
        while self.width(value, vs) > line_width - 4.0 && vs > TEXT_PT_MIN {
            vs -= 0.5;
        }
        self.text(vx + 2.0, y, vs, value, Align::Left);
        self.line(vx, y + 3.0, vx + line_width, y + 3.0, 0.5);
        vx + line_width
    }

    /// Choices separated by ・, with the selected ones circled. Returns the x after the last.
    fn choices(&mut self, x: f32, y: f32, size: f32, options: &[(&str, bool)]) -> f32 {
        let mut cx = x;
        for (i, (label, selected)) in options.iter().enumerate() {
            if i > 0 {
                self.text(cx, y, size, "　・　", Align::Left);
                cx += self.width("　・　", size);
            }
            let w = self.width(label, size);
            self.text(cx, y, size, label, Align::Left);
            if *selected {
                self.circle(cx - 3.0, y - size - 1.5, w + 6.0, size + 5.0);
            }
            cx += w;
        }
        cx
    }

    /// The heading of each sheet: `第N表` boxed at the left, the title in the middle, 作成年月日 at the right.
    fn heading(&mut self, sheet: &str, title: &str, created_on: &str) {
        let w = self.width(sheet, 9.0) + 8.0;
        self.rect(LEFT, 26.0, w, 15.0, 0.8);
        self.text(LEFT + 4.0, 37.0, 9.0, sheet, Align::Left);
        self.text(PAGE_WIDTH_PT / 2.0, 40.0, 15.0, title, Align::Center);
        self.text(
            RIGHT,
            40.0,
            9.0,
            &format!("作成年月日　{}", jdate(created_on)),
            Align::Right,
        );
    }
}

/// Wraps `text` to `width` with the measure `width_of` (see [`Pen::wrap`]). Japanese breaks
/// between any two characters; a run of ASCII letters and digits (a date, a phone number) breaks
/// after its last space, `〜`, `-` or `/` when it has one, so `2025-04-01〜2025-09-30` splits at `〜`.
fn wrap_with(width_of: impl Fn(&str) -> f32, text: &str, width: f32) -> Vec<String> {
    const HANGING: &str = "、。，．）」』】〕・ー…〜～ぁぃぅぇぉっゃゅょァィゥェォッャュョ,.):;!?";
    let word = |c: char| c.is_ascii_alphanumeric();
    let opportunity = |c: char| matches!(c, ' ' | '〜' | '～' | '-' | '/' | '　') || !c.is_ascii();
    let mut out = Vec::new();
    for paragraph in text.replace("\r\n", "\n").split('\n') {
        let mut line = String::new();
        for c in paragraph.chars() {
            let mut candidate = line.clone();
            candidate.push(c);
            if line.is_empty() || width_of(&candidate) <= width || HANGING.contains(c) {
                line = candidate;
                continue;
            }
            // Inside an ASCII word: carry the word over to the next line if there is a break before it.
            let split = (word(c) && line.chars().last().is_some_and(word))
                .then(|| line.char_indices().rev().find(|(_, ch)| opportunity(*ch)))
                .flatten()
                .map(|(at, ch)| at + ch.len_utf8())
                .filter(|at| *at < line.len());
            match split {
                Some(at) => {
                    let rest = line.split_off(at);
                    out.push(std::mem::replace(&mut line, rest));
                    line.push(c);
                }
                None => {
                    out.push(std::mem::take(&mut line));
                    line.push(c);
                }
            }
        }
        out.push(line);
    }
    while out.len() > 1 && out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    out
}

/// `2025-04-01` → `2025年4月1日`; empty → the blank form's `　　年　　月　　日`.
fn jdate(date: &str) -> String {
    let parts: Vec<&str> = date.trim().split('-').collect();
    match parts.as_slice() {
        [y, m, d] => format!(
            "{y}年{}月{}日",
            m.trim_start_matches('0'),
            d.trim_start_matches('0')
        ),
        _ if date.trim().is_empty() => "　　年　　月　　日".to_owned(),
        _ => date.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// 第1表
// ---------------------------------------------------------------------------------------------

fn sheet1(pen: &mut Pen<'_, '_>, s: &Sheet1) {
    pen.heading("第1表", "居宅サービス計画書（１）", &s.created_on);
    let c = s.category;
    let x = pen.choices(
        470.0,
        64.0,
        10.0,
        &[
            ("初回", c.initial),
            ("紹介", c.referral),
            ("継続", c.continuing),
        ],
    );
    pen.choices(
        x + 40.0,
        64.0,
        10.0,
        &[
            ("認定済", s.certification == Some(Certification::Certified)),
            ("申請中", s.certification == Some(Certification::Applying)),
        ],
    );

    let x = pen.field(LEFT, 88.0, "利用者名", &s.resident.name, 130.0);
    pen.text(x + 3.0, 88.0, 9.0, "殿", Align::Left);
    let x = pen.field(
        x + 30.0,
        88.0,
        "生年月日",
        &jdate(&s.resident.birth_date),
        110.0,
    );
    let address = if s.resident.postal_code.is_empty() {
        s.resident.address.clone()
    } else {
        format!("〒{} {}", s.resident.postal_code, s.resident.address)
    };
    pen.field(x + 20.0, 88.0, "住所", &address, RIGHT - x - 20.0 - 24.0);
    pen.field(LEFT, 110.0, "居宅サービス計画作成者氏名", &s.planner, 200.0);
    let office = [s.office.name.as_str(), s.office.address.as_str()]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("　");
    pen.field(
        LEFT,
        132.0,
        "居宅介護支援事業者・事業所名及び所在地",
        &office,
        RIGHT - LEFT - 180.0,
    );
    let x = pen.field(
        LEFT,
        154.0,
        "居宅サービス計画作成（変更）日",
        &jdate(&s.changed_on),
        120.0,
    );
    pen.field(
        x + 40.0,
        154.0,
        "初回居宅サービス計画作成日",
        &jdate(&s.first_created_on),
        120.0,
    );
    let x = pen.field(LEFT, 176.0, "認定日", &jdate(&s.certified_on), 120.0);
    pen.field(
        x + 40.0,
        176.0,
        "認定の有効期間",
        &format!("{} ～ {}", jdate(&s.valid_from), jdate(&s.valid_to)),
        260.0,
    );

    // The bordered table of 第1表.
    let label_w = 150.0;
    let top = 188.0;
    let rows: [(&str, f32); 5] = [
        ("要介護状態区分", 26.0),
        (
            "利用者及び家族の生活に対する意向を踏まえた課題分析の結果",
            108.0,
        ),
        ("介護認定審査会の意見及びサービスの種類の指定", 52.0),
        ("総合的な援助の方針", 108.0),
        ("生活援助中心型の算定理由", 26.0),
    ];
    let mut y = top;
    for (i, (label, h)) in rows.iter().enumerate() {
        pen.rect(LEFT, y, label_w, *h, 0.6);
        pen.rect(LEFT + label_w, y, RIGHT - LEFT - label_w, *h, 0.6);
        let lines = pen.wrap(label, 8.5, label_w - 8.0);
        let block = lines.len() as f32 * 8.5 * LINE_FACTOR;
        for (j, line) in lines.iter().enumerate() {
            let baseline = y + (h - block) / 2.0 + 8.5 + j as f32 * 8.5 * LINE_FACTOR;
            pen.text(LEFT + 4.0, baseline, 8.5, line, Align::Left);
        }
        let vx = LEFT + label_w;
        let vw = RIGHT - vx;
        match i {
            0 => {
                let level = s.care_level;
                let mut options: Vec<(&str, bool)> = [
                    (CareLevel::Care1, "要介護１"),
                    (CareLevel::Care2, "要介護２"),
                    (CareLevel::Care3, "要介護３"),
                    (CareLevel::Care4, "要介護４"),
                    (CareLevel::Care5, "要介護５"),
                ]
                .iter()
                .map(|(l, label)| (*label, level == Some(*l)))
                .collect();
                if let Some(other) = level.filter(|l| {
                    matches!(
                        l,
                        CareLevel::Eligible | CareLevel::Support1 | CareLevel::Support2
                    )
                }) {
                    options.push((other.label(), true));
                }
                pen.choices(vx + 20.0, y + 17.0, 10.0, &options);
            }
            1 => {
                pen.text_box(vx, y, vw, *h, 9.5, &s.assessment);
            }
            2 => {
                pen.text_box(vx, y, vw, *h, 9.5, &s.committee_opinion);
            }
            3 => {
                pen.text_box(vx, y, vw, *h, 9.5, &s.policy);
            }
            _ => {
                let reason = s.housework_reason;
                let other = if s.housework_reason_other.is_empty() {
                    "　　　　　　".to_owned()
                } else {
                    s.housework_reason_other.clone()
                };
                let other_label = format!("3. その他（{other}）");
                pen.choices(
                    vx + 20.0,
                    y + 17.0,
                    9.5,
                    &[
                        ("1. 一人暮らし", reason == Some(HouseworkReason::LivesAlone)),
                        (
                            "2. 家族等が障害、疾病等",
                            reason == Some(HouseworkReason::FamilyUnable),
                        ),
                        (other_label.as_str(), reason == Some(HouseworkReason::Other)),
                    ],
                );
            }
        }
        y += h;
    }
    pen.rect(LEFT, top, RIGHT - LEFT, y - top, 1.0);

    // 同意欄.
    let cy = y + 14.0;
    pen.rect(LEFT, cy, RIGHT - LEFT, 40.0, 0.8);
    pen.text(
        LEFT + 8.0,
        cy + 16.0,
        9.0,
        "居宅サービス計画について説明を受け、内容に同意し交付を受けました。",
        Align::Left,
    );
    let x = pen.field(
        LEFT + 8.0,
        cy + 32.0,
        "説明・同意日",
        &jdate(&s.consent.date),
        130.0,
    );
    pen.field(x + 40.0, cy + 32.0, "利用者同意欄", &s.consent.by, 180.0);
}

// ---------------------------------------------------------------------------------------------
// 第2表
// ---------------------------------------------------------------------------------------------

/// Column widths of 第2表: ニーズ, 長期目標, （期間）, 短期目標, （期間）, サービス内容, ※1, サービス種別, ※2, 頻度, 期間.
const SHEET2_COLUMNS: [f32; 11] = [
    105.0, 90.0, 52.0, 90.0, 52.0, 118.0, 18.0, 65.0, 90.0, 48.0, 53.89,
];
const SHEET2_PT: f32 = 7.5;
const SHEET2_TOP: f32 = 104.0;
const SHEET2_BOTTOM: f32 = BOTTOM - 24.0;

/// One printed row of 第2表 (one service, or a goal or need without services), with the group it
/// starts (so spanning cells are drawn once per group).
struct Row2<'p> {
    need: (usize, &'p str),
    long: Option<(usize, &'p str, &'p str)>,
    short: Option<(usize, &'p str, &'p str)>,
    service: Option<&'p musubi_crdt::documents::careplan::Service>,
    height: f32,
}

fn sheet2_rows<'p>(plan: &'p CarePlan, font: &JapaneseFont) -> Vec<Row2<'p>> {
    let mut rows: Vec<Row2<'p>> = Vec::new();
    let lines_h = |text: &str, col: usize| -> f32 {
        let lines = wrap_with(
            |s| font.width(s, SHEET2_PT),
            text,
            SHEET2_COLUMNS[col] - 5.0,
        );
        lines.len() as f32 * SHEET2_PT * LINE_FACTOR + 5.0
    };
    let mut long_no = 0;
    let mut short_no = 0;
    for (ni, need) in plan.needs.iter().enumerate() {
        let need_start = rows.len();
        if need.goals.is_empty() {
            rows.push(Row2 {
                need: (ni, &need.text),
                long: None,
                short: None,
                service: None,
                height: 16.0,
            });
        }
        for goal in &need.goals {
            long_no += 1;
            let long_start = rows.len();
            let long = Some((long_no, goal.text.as_str(), goal.period.as_str()));
            if goal.short_goals.is_empty() {
                rows.push(Row2 {
                    need: (ni, &need.text),
                    long,
                    short: None,
                    service: None,
                    height: 16.0,
                });
            }
            for short in &goal.short_goals {
                short_no += 1;
                let short_start = rows.len();
                let s = Some((short_no, short.text.as_str(), short.period.as_str()));
                if short.services.is_empty() {
                    rows.push(Row2 {
                        need: (ni, &need.text),
                        long,
                        short: s,
                        service: None,
                        height: 16.0,
                    });
                }
                for service in &short.services {
                    let height = [
                        (service.content.as_str(), 5),
                        (service.kind.as_str(), 7),
                        (service.provider.as_str(), 8),
                        (service.frequency.as_str(), 9),
                        (service.period.as_str(), 10),
                    ]
                    .iter()
                    .map(|(t, c)| lines_h(t, *c))
                    .fold(16.0, f32::max);
                    rows.push(Row2 {
                        need: (ni, &need.text),
                        long,
                        short: s,
                        service: Some(service),
                        height,
                    });
                }
                let want = lines_h(&short.text, 3).max(lines_h(&short.period, 4));
                grow(&mut rows[short_start..], want);
            }
            let want = lines_h(&goal.text, 1).max(lines_h(&goal.period, 2));
            grow(&mut rows[long_start..], want);
        }
        let want = lines_h(&need.text, 0);
        grow(&mut rows[need_start..], want);
    }
    // A group taller than a page is split by the page break anyway; cap single rows to a page.
    for row in &mut rows {
        row.height = row.height.min(SHEET2_BOTTOM - SHEET2_TOP);
    }
    rows
}

/// Makes `rows` at least `want` tall together, by growing the last one.
fn grow(rows: &mut [Row2<'_>], want: f32) {
    let have: f32 = rows.iter().map(|r| r.height).sum();
    if have < want
        && let Some(last) = rows.last_mut()
    {
        last.height += want - have;
    }
}

/// Draws one page of 第2表 from row `start`; returns the first row not drawn.
fn sheet2_page(pen: &mut Pen<'_, '_>, plan: &CarePlan, rows: &[Row2<'_>], start: usize) -> usize {
    let s = &plan.sheet1;
    pen.heading("第2表", "居宅サービス計画書（２）", &s.created_on);
    let x = pen.field(LEFT, 66.0, "利用者名", &s.resident.name, 130.0);
    pen.text(x + 3.0, 66.0, 9.0, "殿", Align::Left);
    if start > 0 {
        pen.text(RIGHT, 66.0, 8.0, "（続き）", Align::Right);
    }

    let xs: Vec<f32> = SHEET2_COLUMNS
        .iter()
        .scan(LEFT, |x, w| {
            let at = *x;
            *x += w;
            Some(at)
        })
        .collect();
    // Header: two rows.
    let (h1, h2) = (76.0, 90.0);
    pen.shade(LEFT, h1, RIGHT - LEFT, SHEET2_TOP - h1, 238);
    pen.rect(LEFT, h1, RIGHT - LEFT, SHEET2_TOP - h1, 1.0);
    pen.line(xs[1], h2, RIGHT, h2, 0.6);
    let headers2 = [
        "",
        "長期目標",
        "（期間）",
        "短期目標",
        "（期間）",
        "サービス内容",
        "※1",
        "サービス種別",
        "※2",
        "頻度",
        "期間",
    ];
    for (i, &x) in xs.iter().enumerate().skip(1) {
        let top = if i == 1 || i == 5 { h1 } else { h2 };
        pen.line(x, top, x, SHEET2_TOP, 0.6);
    }
    for (i, label) in headers2.iter().enumerate().skip(1) {
        pen.text(
            xs[i] + SHEET2_COLUMNS[i] / 2.0,
            h2 + 10.0,
            7.5,
            label,
            Align::Center,
        );
    }
    for (i, line) in ["生活全般の解決すべき", "課題（ニーズ）"]
        .iter()
        .enumerate()
    {
        pen.text(
            xs[0] + SHEET2_COLUMNS[0] / 2.0,
            h1 + 11.0 + i as f32 * 10.0,
            7.5,
            line,
            Align::Center,
        );
    }
    pen.text((xs[1] + xs[5]) / 2.0, h1 + 10.5, 8.0, "目標", Align::Center);
    pen.text(
        (xs[5] + RIGHT) / 2.0,
        h1 + 10.5,
        8.0,
        "援助内容",
        Align::Center,
    );

    // Body.
    let mut y = SHEET2_TOP;
    let mut i = start;
    let key = |r: &Row2<'_>| (r.need.0, r.long.map(|l| l.0), r.short.map(|s| s.0));
    while i < rows.len() && (y + rows[i].height <= SHEET2_BOTTOM || i == start) {
        let row = &rows[i];
        let (need_no, long_no, short_no) = key(row);
        // Where the previous row (on any page) belongs: a group starts where its key changes.
        let prev = (i > 0).then(|| key(&rows[i - 1]));
        let first_need = prev.is_none_or(|p| p.0 != need_no);
        let first_long = first_need || prev.is_none_or(|p| p.1 != long_no);
        let first_short = first_long || prev.is_none_or(|p| p.2 != short_no);
        // On this page a group's cells start at its first row, or at the page's first row.
        let (new_need, new_long, new_short) = if i == start {
            (true, true, true)
        } else {
            (first_need, first_long, first_short)
        };
        // The group's height from here to its last row on this page.
        let span_height = |level: usize| -> f32 {
            let mut h = 0.0;
            for r in &rows[i..] {
                let k = key(r);
                let same = match level {
                    0 => k.0 == need_no,
                    1 => k.0 == need_no && k.1 == long_no,
                    _ => k == (need_no, long_no, short_no),
                };
                if !same || (h > 0.0 && y + h + r.height > SHEET2_BOTTOM) {
                    break;
                }
                h += r.height;
            }
            h
        };
        if new_need {
            let h = span_height(0);
            let text = if first_need { row.need.1 } else { "〃" };
            pen.rect(xs[0], y, SHEET2_COLUMNS[0], h, 0.6);
            pen.text_box(xs[0], y, SHEET2_COLUMNS[0], h, SHEET2_PT, text);
        }
        if new_long {
            let h = span_height(1);
            let (text, period) = match row.long {
                Some((_, t, p)) if first_long => (t, p),
                Some(_) => ("〃", ""),
                None => ("", ""),
            };
            for (col, t) in [(1, text), (2, period)] {
                pen.rect(xs[col], y, SHEET2_COLUMNS[col], h, 0.6);
                pen.text_box(xs[col], y, SHEET2_COLUMNS[col], h, SHEET2_PT, t);
            }
        }
        if new_short {
            let h = span_height(2);
            let (text, period) = match row.short {
                Some((_, t, p)) if first_short => (t, p),
                Some(_) => ("〃", ""),
                None => ("", ""),
            };
            for (col, t) in [(3, text), (4, period)] {
                pen.rect(xs[col], y, SHEET2_COLUMNS[col], h, 0.6);
                pen.text_box(xs[col], y, SHEET2_COLUMNS[col], h, SHEET2_PT, t);
            }
        }
        let cells: [String; 6] = match row.service {
            Some(v) => [
                v.content.clone(),
                if v.insured {
                    "○".to_owned()
                } else {
                    String::new()
                },
                v.kind.clone(),
                v.provider.clone(),
                v.frequency.clone(),
                v.period.clone(),
            ],
            None => Default::default(),
        };
        for (k, text) in cells.iter().enumerate() {
            let col = 5 + k;
            pen.rect(xs[col], y, SHEET2_COLUMNS[col], row.height, 0.6);
            if k == 1 {
                pen.text(
                    xs[col] + SHEET2_COLUMNS[col] / 2.0,
                    y + 11.0,
                    8.0,
                    text,
                    Align::Center,
                );
            } else {
                pen.text_box(xs[col], y, SHEET2_COLUMNS[col], row.height, SHEET2_PT, text);
            }
        }
        y += row.height;
        i += 1;
    }
    if rows.is_empty() {
        pen.rect(LEFT, y, RIGHT - LEFT, 40.0, 0.6);
        y += 40.0;
    }
    pen.rect(LEFT, SHEET2_TOP, RIGHT - LEFT, y - SHEET2_TOP, 1.0);
    pen.text(
        LEFT,
        BOTTOM - 10.0,
        7.5,
        "※1「保険給付の対象となるかどうかの区分」について、保険給付対象内サービスについては○印を付す。",
        Align::Left,
    );
    pen.text(
        LEFT,
        BOTTOM,
        7.5,
        "※2「当該サービス提供を行う事業所」について記入する。",
        Align::Left,
    );
    i.max(start + 1)
}

// ---------------------------------------------------------------------------------------------
// 第3表
// ---------------------------------------------------------------------------------------------

fn sheet3(pen: &mut Pen<'_, '_>, plan: &CarePlan) {
    let s = &plan.sheet1;
    pen.heading("第3表", "週間サービス計画表", &s.created_on);
    let x = pen.field(LEFT, 66.0, "利用者名", &s.resident.name, 130.0);
    pen.text(x + 3.0, 66.0, 9.0, "殿", Align::Left);

    let band_w = 24.0;
    let time_w = 30.0;
    let day_w = 78.0;
    let grid_left = LEFT + band_w + time_w;
    let act_left = grid_left + 7.0 * day_w;
    let head_top = 76.0;
    let top = 90.0;
    let bottom = 500.0;
    let hour = (bottom - top) / 24.0;
    let y_of = |t: &str| -> f32 {
        let (h, m) = t.split_once(':').unwrap_or(("0", "0"));
        let minutes = h.parse::<f32>().unwrap_or(0.0) * 60.0 + m.parse::<f32>().unwrap_or(0.0);
        top + minutes / 60.0 * hour
    };

    // Header row.
    pen.shade(LEFT, head_top, RIGHT - LEFT, top - head_top, 238);
    for (i, day) in Weekday::ALL.iter().enumerate() {
        pen.text(
            grid_left + day_w * (i as f32 + 0.5),
            head_top + 10.0,
            9.0,
            day.label(),
            Align::Center,
        );
    }
    pen.text(
        (act_left + RIGHT) / 2.0,
        head_top + 10.0,
        8.5,
        "主な日常生活上の活動",
        Align::Center,
    );

    // Hour lines and labels.
    for h in 0..=24 {
        let y = top + h as f32 * hour;
        let width = if h % 2 == 0 { 0.5 } else { 0.2 };
        pen.line(grid_left, y, act_left, y, width);
        if h % 2 == 0 {
            pen.line(grid_left - 3.0, y, grid_left, y, 0.5);
            let baseline = match h {
                0 => y + 7.5,
                24 => y - 1.5,
                _ => y + 2.5,
            };
            pen.text(
                LEFT + band_w + time_w / 2.0,
                baseline,
                7.0,
                &format!("{h}:00"),
                Align::Center,
            );
        }
    }
    // Time-of-day bands, written vertically as on the form.
    for (from, to, label) in [
        (0, 6, "深夜"),
        (6, 8, "早朝"),
        (8, 12, "午前"),
        (12, 18, "午後"),
        (18, 22, "夜間"),
        (22, 24, "深夜"),
    ] {
        let (y1, y2) = (top + from as f32 * hour, top + to as f32 * hour);
        pen.rect(LEFT, y1, band_w, y2 - y1, 0.6);
        let chars: Vec<char> = label.chars().collect();
        let size = 8.0;
        let block = chars.len() as f32 * size * 1.15;
        for (k, c) in chars.iter().enumerate() {
            pen.text(
                LEFT + band_w / 2.0,
                (y1 + y2) / 2.0 - block / 2.0 + size + k as f32 * size * 1.15,
                size,
                &c.to_string(),
                Align::Center,
            );
        }
    }
    for i in 0..=7 {
        let x = grid_left + i as f32 * day_w;
        pen.line(x, head_top, x, bottom, 0.6);
    }
    pen.line(LEFT + band_w, head_top, LEFT + band_w, bottom, 0.6);
    pen.rect(LEFT, head_top, RIGHT - LEFT, bottom - head_top, 1.0);

    // Services on the grid; overlapping ones of a day share the column.
    for day in Weekday::ALL {
        let entries: Vec<_> = plan
            .weekly
            .entries
            .iter()
            .filter(|e| e.day == day)
            .collect();
        let mut lanes: Vec<String> = Vec::new(); // end time of each lane's last entry
        let mut placed = Vec::new();
        for e in &entries {
            let lane = match lanes
                .iter()
                .position(|end| end.as_str() <= e.start.as_str())
            {
                Some(l) => l,
                None => {
                    lanes.push(String::new());
                    lanes.len() - 1
                }
            };
            lanes[lane] = e.end.clone();
            placed.push((lane, *e));
        }
        let lane_w = day_w / lanes.len().max(1) as f32;
        for (lane, e) in placed {
            let x = grid_left + day.index() as f32 * day_w + lane as f32 * lane_w;
            let (y1, y2) = (y_of(&e.start), y_of(&e.end));
            pen.shade(x + 1.5, y1 + 0.5, lane_w - 3.0, y2 - y1 - 1.0, 225);
            pen.rect(x + 1.5, y1 + 0.5, lane_w - 3.0, y2 - y1 - 1.0, 0.5);
            let label = if y2 - y1 >= 30.0 {
                format!("{}\n{}〜{}", e.service, e.start, e.end)
            } else {
                e.service.clone()
            };
            pen.text_box(x + 1.5, y1 + 0.5, lane_w - 3.0, y2 - y1 - 1.0, 7.0, &label);
        }
    }
    // 主な日常生活上の活動 at their times.
    for a in &plan.weekly.activities {
        let y = y_of(&a.start);
        let when = if a.end.is_empty() || a.end == a.start {
            a.start.clone()
        } else {
            format!("{}〜{}", a.start, a.end)
        };
        pen.line(act_left, y, act_left + 6.0, y, 0.6);
        pen.text(
            act_left + 8.0,
            y + 3.0,
            7.5,
            &format!("{when}　{}", a.text),
            Align::Left,
        );
    }

    // 週単位以外のサービス.
    let y = bottom + 8.0;
    let h = BOTTOM - y;
    pen.rect(LEFT, y, 110.0, h, 0.8);
    pen.rect(LEFT + 110.0, y, RIGHT - LEFT - 110.0, h, 0.8);
    pen.text(
        LEFT + 55.0,
        y + h / 2.0 - 2.0,
        8.5,
        "週単位以外の",
        Align::Center,
    );
    pen.text(
        LEFT + 55.0,
        y + h / 2.0 + 9.0,
        8.5,
        "サービス",
        Align::Center,
    );
    pen.text_box(
        LEFT + 110.0,
        y,
        RIGHT - LEFT - 110.0,
        h,
        9.0,
        &plan.weekly.non_weekly,
    );
}

// ---------------------------------------------------------------------------------------------
// 様式11 診療情報提供書
// ---------------------------------------------------------------------------------------------

/// Page width of A4 portrait (the referral letter), in points.
pub const PORTRAIT_WIDTH_PT: f32 = PAGE_HEIGHT_PT;
/// Page height of A4 portrait, in points.
pub const PORTRAIT_HEIGHT_PT: f32 = PAGE_WIDTH_PT;

const R_LEFT: f32 = 48.0;
const R_RIGHT: f32 = PORTRAIT_WIDTH_PT - 48.0;
const R_TOP: f32 = 48.0;
const R_BOTTOM: f32 = PORTRAIT_HEIGHT_PT - 48.0;
const R_LABEL_W: f32 = 118.0;
const R_PT: f32 = 10.0;

/// The bordered sections of 様式11 after the patient block, in the form's order, with the least
/// height each takes on the page (points): the blank form's proportions.
const REFERRAL_SECTIONS: [(&str, f32); 7] = [
    ("傷病名", 40.0),
    ("紹介目的", 48.0),
    ("既往歴及び家族歴", 48.0),
    ("症状経過及び検査結果", 90.0),
    ("治療経過", 60.0),
    ("現在の処方", 60.0),
    ("備考", 36.0),
];

/// The notes printed under the form (様式11 の備考).
const REFERRAL_NOTES: [&str; 3] = [
    "備考　１．必要がある場合は続紙に記載して添付すること。",
    "　　　２．必要がある場合は画像診断のフィルム、検査の記録を添付すること。",
    "　　　３．紹介先が保険医療機関以外である場合は、紹介先医療機関等名の欄に紹介先保険薬局、市町村、保健所名等を記入すること。かつ、患者住所及び電話番号を必ず記入すること。",
];

/// Age in whole years on `on` of someone born on `birth` (both `YYYY-MM-DD`), if both parse.
fn age_on(birth: &str, on: &str) -> Option<u32> {
    let parse = |d: &str| -> Option<(u32, u32, u32)> {
        let mut it = d.trim().split('-').map(|p| p.parse::<u32>().ok());
        Some((it.next()??, it.next()??, it.next()??))
    };
    let (by, bm, bd) = parse(birth)?;
    let (y, m, d) = parse(on)?;
    let years = y.checked_sub(by)?;
    Some(if (m, d) < (bm, bd) {
        years.checked_sub(1)?
    } else {
        years
    })
}

/// Lays a referral letter out page by page: the open page and the y where drawing continues.
struct Flow<'f> {
    document: Document,
    font: &'f JapaneseFont,
    pages: Vec<Vec<Drawn>>,
    y: f32,
}

/// One thing to draw on a portrait page (recorded first, drawn when the page is finished, so a
/// section's frame can be drawn after its height is known and pages can be added as needed).
enum Drawn {
    Text {
        x: f32,
        y: f32,
        size: f32,
        text: String,
        align: Align,
    },
    Rect {
        x: f32,
        y: f32,
        w: f32,
        h: f32,
        width: f32,
    },
    Line {
        x1: f32,
        y1: f32,
        x2: f32,
        y2: f32,
        width: f32,
    },
    Circle {
        x: f32,
        y: f32,
        w: f32,
        h: f32,
    },
}

impl<'f> Flow<'f> {
    fn new(font: &'f JapaneseFont) -> Self {
        Flow {
            document: Document::new(),
            font,
            pages: vec![Vec::new()],
            y: R_TOP,
        }
    }

    fn width(&self, text: &str, size: f32) -> f32 {
        self.font.width(text, size)
    }

    fn push(&mut self, d: Drawn) {
        if let Some(page) = self.pages.last_mut() {
            page.push(d);
        }
    }

    fn text(&mut self, x: f32, y: f32, size: f32, text: &str, align: Align) {
        self.push(Drawn::Text {
            x,
            y,
            size,
            text: text.to_owned(),
            align,
        });
    }

    fn new_page(&mut self) {
        self.pages.push(Vec::new());
        self.y = R_TOP;
        self.text(R_RIGHT, R_TOP - 14.0, 8.0, "（続紙）", Align::Right);
    }

    /// A label and an underlined value: `label value____`; returns the x after the line.
    fn field(&mut self, x: f32, y: f32, label: &str, value: &str, line_w: f32) -> f32 {
        self.text(x, y, 9.0, label, Align::Left);
        let vx = x + self.width(label, 9.0) + 6.0;
        let mut size = R_PT;
        while self.width(value, size) > line_w - 4.0 && size > TEXT_PT_MIN {
            size -= 0.5;
        }
        self.text(vx + 2.0, y, size, value, Align::Left);
        self.push(Drawn::Line {
            x1: vx,
            y1: y + 3.0,
            x2: vx + line_w,
            y2: y + 3.0,
            width: 0.5,
        });
        vx + line_w
    }

    /// A bordered section: the label cell at the left, `text` wrapped at the right; at least
    /// `min_h` high, continued on the next page (label repeated with `（続き）`) when it does not fit.
    fn section(&mut self, label: &str, text: &str, min_h: f32) {
        let pad = 4.0;
        let line_h = R_PT * LINE_FACTOR;
        let value_w = R_RIGHT - R_LEFT - R_LABEL_W - 2.0 * pad;
        let lines = wrap_with(|s| self.font.width(s, R_PT), text, value_w);
        let lines: Vec<String> = if text.trim().is_empty() {
            Vec::new()
        } else {
            lines
        };
        let mut rest: &[String] = &lines;
        let mut first = true;
        loop {
            let room = R_BOTTOM - self.y;
            let want =
                (rest.len() as f32 * line_h + 2.0 * pad).max(if first { min_h } else { 0.0 });
            // A section that fits on a page starts on the next one rather than split; a longer one
            // starts here if two lines fit.
            let splits = want > R_BOTTOM - R_TOP;
            let min_here = if splits {
                2.0 * line_h + 2.0 * pad
            } else {
                want
            };
            if room < min_here && self.y > R_TOP {
                self.new_page();
                continue;
            }
            let fit = ((room - 2.0 * pad) / line_h).floor().max(1.0) as usize;
            let take = rest.len().min(fit);
            let h = if take == rest.len() {
                want.min(room)
            } else {
                room
            };
            let top = self.y;
            self.push(Drawn::Rect {
                x: R_LEFT,
                y: top,
                w: R_LABEL_W,
                h,
                width: 0.6,
            });
            self.push(Drawn::Rect {
                x: R_LEFT + R_LABEL_W,
                y: top,
                w: R_RIGHT - R_LEFT - R_LABEL_W,
                h,
                width: 0.6,
            });
            let shown = if first {
                label.to_owned()
            } else {
                format!("{label}（続き）")
            };
            let label_lines = wrap_with(|s| self.font.width(s, 9.0), &shown, R_LABEL_W - 8.0);
            for (j, l) in label_lines.iter().enumerate() {
                self.text(
                    R_LEFT + 4.0,
                    top + pad + 9.0 + j as f32 * 9.0 * LINE_FACTOR,
                    9.0,
                    l,
                    Align::Left,
                );
            }
            for (i, l) in rest[..take].iter().enumerate() {
                self.text(
                    R_LEFT + R_LABEL_W + pad,
                    top + pad + R_PT + i as f32 * line_h,
                    R_PT,
                    l,
                    Align::Left,
                );
            }
            self.y = top + h;
            rest = &rest[take..];
            first = false;
            if rest.is_empty() {
                return;
            }
            self.new_page();
        }
    }

    /// Lines of small text across the page (notes), moving to a new page when needed.
    fn paragraph(&mut self, text: &str, size: f32) {
        for line in wrap_with(|s| self.font.width(s, size), text, R_RIGHT - R_LEFT) {
            if self.y + size * LINE_FACTOR > R_BOTTOM {
                self.new_page();
            }
            self.y += size * LINE_FACTOR;
            self.text(R_LEFT, self.y, size, &line, Align::Left);
        }
    }

    fn finish(mut self) -> Result<Vec<u8>, PdfError> {
        let settings = PageSettings::from_wh(PORTRAIT_WIDTH_PT, PORTRAIT_HEIGHT_PT)
            .ok_or_else(|| PdfError::Render("invalid page size".to_owned()))?;
        let pages = std::mem::take(&mut self.pages);
        for drawn in pages {
            let mut page = self.document.start_page_with(settings.clone());
            let mut surface = page.surface();
            {
                let mut pen = Pen::new(&mut surface, self.font);
                for d in drawn {
                    match d {
                        Drawn::Text {
                            x,
                            y,
                            size,
                            text,
                            align,
                        } => pen.text(x, y, size, &text, align),
                        Drawn::Rect { x, y, w, h, width } => pen.rect(x, y, w, h, width),
                        Drawn::Line {
                            x1,
                            y1,
                            x2,
                            y2,
                            width,
                        } => pen.line(x1, y1, x2, y2, width),
                        Drawn::Circle { x, y, w, h } => pen.circle(x, y, w, h),
                    }
                }
            }
            surface.finish();
            page.finish();
        }
        self.document
            .finish()
            .map_err(|e| PdfError::Render(format!("{e:?}")))
    }
}

/// Draws a referral letter in the layout of 様式11 (診療情報提供書), A4 portrait: 紹介先, the date
/// `written_on` (`YYYY-MM-DD`; empty prints the blank form's date), 紹介元, the patient block, the
/// bordered sections (傷病名 … 備考) and the form's notes; then, when present, the list of 添付 and
/// the 返書. Long sections continue on further pages (続紙).
///
/// # Errors
///
/// [`PdfError::Render`] when the PDF writer fails.
pub fn render_referral(
    letter: &ReferralLetter,
    written_on: &str,
    font: &JapaneseFont,
) -> Result<Vec<u8>, PdfError> {
    let mut f = Flow::new(font);
    let p = &letter.patient;
    f.text(
        PORTRAIT_WIDTH_PT / 2.0,
        R_TOP + 16.0,
        16.0,
        "診 療 情 報 提 供 書",
        Align::Center,
    );
    f.text(R_LEFT, R_TOP - 14.0, 8.0, "（別紙様式11）", Align::Left);
    f.text(
        R_RIGHT,
        R_TOP + 42.0,
        10.0,
        &jdate(written_on),
        Align::Right,
    );

    // 紹介先.
    f.field(
        R_LEFT,
        R_TOP + 64.0,
        "紹介先医療機関等名",
        &letter.to_facility,
        240.0,
    );
    let x = f.field(R_LEFT, R_TOP + 86.0, "担当医", &letter.to_doctor, 240.0);
    f.text(x + 4.0, R_TOP + 86.0, 10.0, "殿", Align::Left);

    // 紹介元.
    let fx = 300.0;
    f.field(
        fx,
        R_TOP + 112.0,
        "紹介元医療機関の所在地及び名称",
        "",
        R_RIGHT - fx - 150.0,
    );
    f.field(
        fx,
        R_TOP + 130.0,
        "",
        &letter.from_facility,
        R_RIGHT - fx - 6.0,
    );
    let x = f.field(
        fx,
        R_TOP + 150.0,
        "医師氏名",
        &letter.from_doctor,
        R_RIGHT - fx - 62.0,
    );
    f.text(x + 4.0, R_TOP + 150.0, 9.0, "印", Align::Left);

    // 患者.
    let py = R_TOP + 178.0;
    let x = f.field(R_LEFT, py, "患者氏名", &p.name, 170.0);
    let sx = x + 16.0;
    f.text(sx, py, 9.0, "性別", Align::Left);
    let mut cx = sx + f.width("性別", 9.0) + 8.0;
    let known = matches!(p.sex.trim(), "男" | "女");
    for (i, label) in ["男", "女"].into_iter().enumerate() {
        if i > 0 {
            f.text(cx, py, R_PT, "・", Align::Left);
            cx += f.width("・", R_PT);
        }
        let w = f.width(label, R_PT);
        f.text(cx, py, R_PT, label, Align::Left);
        if p.sex.trim() == label {
            f.push(Drawn::Circle {
                x: cx - 3.0,
                y: py - R_PT - 1.5,
                w: w + 6.0,
                h: R_PT + 5.0,
            });
        }
        cx += w;
    }
    if !known && !p.sex.trim().is_empty() {
        f.text(
            cx + 8.0,
            py,
            R_PT,
            &format!("（{}）", p.sex.trim()),
            Align::Left,
        );
    }
    if !p.kana.trim().is_empty() {
        f.text(R_LEFT + 50.0, py - 13.0, 7.0, &p.kana, Align::Left);
    }
    f.field(
        R_LEFT,
        py + 22.0,
        "患者住所",
        &p.address,
        R_RIGHT - R_LEFT - 50.0,
    );
    f.field(R_LEFT, py + 44.0, "電話番号", &p.phone, 170.0);
    let age = age_on(&p.birth_date, written_on)
        .map(|a| format!("（{a}歳）"))
        .unwrap_or_default();
    let x = f.field(
        R_LEFT,
        py + 66.0,
        "生年月日",
        &format!("{}{age}", jdate(&p.birth_date)),
        190.0,
    );
    f.field(
        x + 16.0,
        py + 66.0,
        "職業",
        &p.occupation,
        R_RIGHT - x - 16.0 - 30.0,
    );

    // The bordered sections.
    f.y = py + 84.0;
    let texts = [
        &letter.diagnosis,
        &letter.purpose,
        &letter.history,
        &letter.progress,
        &letter.treatment,
        &letter.prescription,
        &letter.remarks,
    ];
    for ((label, min_h), text) in REFERRAL_SECTIONS.iter().zip(texts) {
        f.section(label, text, *min_h);
    }
    f.y += 4.0;
    for note in REFERRAL_NOTES {
        f.paragraph(note, 7.5);
    }
    if !letter.attachments.is_empty() {
        f.y += 10.0;
        let list = letter
            .attachments
            .iter()
            .map(|a| {
                format!(
                    "・{}（{}、{} KB）",
                    a.name,
                    a.media_type,
                    a.bytes.div_ceil(1024)
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        f.section("添付", &list, 24.0);
    }
    if !letter.reply.trim().is_empty() {
        f.y += 10.0;
        f.section("返書", &letter.reply, 48.0);
    }
    f.finish()
}

#[cfg(test)]
mod tests {
    use automerge::AutoCommit;
    use musubi_crdt::documents::careplan::{
        self as schema, Activity, Placement, PlanField, Service, WeeklyEntry,
    };

    use super::*;

    /// A plan with every sheet filled, 第2表 long enough for two pages.
    fn sample_plan(needs: usize) -> CarePlan {
        let mut sheet = Sheet1::default();
        for (field, value) in [
            (PlanField::CreatedOn, "2025-04-01"),
            (PlanField::ChangedOn, "2025-04-01"),
            (PlanField::FirstCreatedOn, "2024-04-01"),
            (PlanField::Category, "初回,紹介"),
            (PlanField::Certification, "認定済"),
            (PlanField::CertifiedOn, "2025-03-25"),
            (PlanField::ValidFrom, "2025-04-01"),
            (PlanField::ValidTo, "2026-03-31"),
            (PlanField::CareLevel, "要介護2"),
            (PlanField::ResidentName, "山田 花子"),
            (PlanField::ResidentBirthDate, "1940-02-29"),
            (PlanField::ResidentPostalCode, "945-0011"),
            (PlanField::ResidentAddress, "新潟県柏崎市松波１－２－３"),
            (
                PlanField::Assessment,
                "本人：住み慣れた家で夫と暮らし続けたい。家族：転倒が心配なので、入浴は手伝ってほしい。\n課題：下肢筋力の低下により屋内でのつまずきが増えている。服薬の飲み忘れがある。",
            ),
            (PlanField::CommitteeOpinion, "特になし"),
            (
                PlanField::Policy,
                "転倒を防ぎ、在宅生活を続けられるよう、訪問介護と通所リハビリテーションで支援します。緊急連絡先：長男（090-0000-0000）、主治医：港診療所。",
            ),
            (PlanField::HouseworkReason, "その他"),
            (PlanField::HouseworkReasonOther, "夫が高齢で家事が困難"),
            (PlanField::Planner, "佐藤 ケア子"),
            (PlanField::OfficeName, "みなと居宅介護支援事業所"),
            (PlanField::OfficeAddress, "新潟県柏崎市東本町１－１"),
            (PlanField::ConsentDate, "2025-04-01"),
            (PlanField::ConsentBy, "山田 花子"),
        ] {
            sheet.set(field, value).expect("valid");
        }
        let mut doc = AutoCommit::new();
        schema::init(&mut doc, &sheet).expect("init");
        let last = &Placement::Last;
        for n in 0..needs {
            let need = format!("n{n}");
            schema::add_need(
                &mut doc,
                &need,
                &format!("安全に入浴できるようになりたい（課題{n}）"),
                last,
            )
            .expect("need");
            schema::add_long_term_goal(
                &mut doc,
                &need,
                &format!("l{n}"),
                "自宅の浴槽で週2回入浴できる",
                "2025-04-01〜2026-03-31",
                last,
            )
            .expect("goal");
            for k in 0..2 {
                let short = format!("s{n}-{k}");
                schema::add_short_term_goal(
                    &mut doc,
                    &format!("l{n}"),
                    &short,
                    "介助を受けて安全に入浴する",
                    "2025-04-01〜2025-09-30",
                    last,
                )
                .expect("short");
                for v in 0..2 {
                    let service = Service {
                        content: "入浴介助、浴室内の見守り、更衣の介助".to_owned(),
                        insured: v == 0,
                        kind: if v == 0 { "訪問介護" } else { "家族" }.to_owned(),
                        provider: if v == 0 {
                            "ひまわりヘルパーステーション"
                        } else {
                            "長男"
                        }
                        .to_owned(),
                        frequency: "週2回".to_owned(),
                        period: "2025-04-01〜2025-09-30".to_owned(),
                        ..Service::default()
                    };
                    schema::add_service(&mut doc, &short, &format!("v{n}-{k}-{v}"), &service, last)
                        .expect("service");
                }
            }
        }
        for (id, day, start, end, service) in [
            ("w1", Weekday::Mon, "10:00", "11:00", "訪問介護"),
            ("w2", Weekday::Thu, "10:00", "11:00", "訪問介護"),
            (
                "w3",
                Weekday::Wed,
                "09:00",
                "16:00",
                "通所リハビリテーション",
            ),
            ("w4", Weekday::Wed, "13:00", "14:00", "訪問看護"),
        ] {
            schema::add_weekly_entry(
                &mut doc,
                &WeeklyEntry {
                    id: id.to_owned(),
                    day,
                    start: start.to_owned(),
                    end: end.to_owned(),
                    service: service.to_owned(),
                },
            )
            .expect("weekly");
        }
        for (id, start, text) in [
            ("a1", "06:00", "起床"),
            ("a2", "12:00", "昼食"),
            ("a3", "21:00", "就寝"),
        ] {
            schema::add_activity(
                &mut doc,
                &Activity {
                    id: id.to_owned(),
                    start: start.to_owned(),
                    end: String::new(),
                    text: text.to_owned(),
                },
            )
            .expect("activity");
        }
        schema::set_non_weekly(&mut doc, "福祉用具貸与（車いす）、月1回 港診療所へ通院")
            .expect("non weekly");
        schema::read(&doc).expect("read")
    }

    #[test]
    fn the_three_sheets_render_with_the_system_font() {
        let font = find_font().expect("a Japanese font (apt-get install fonts-ipaexfont-gothic)");
        let pdf = render(&sample_plan(6), &font).expect("render");
        assert!(pdf.starts_with(b"%PDF-"));
        assert!(
            pdf.len() < 400_000,
            "the font is subset: {} bytes",
            pdf.len()
        );
        let pages = pdf
            .windows(b"/Type /Page\n".len())
            .filter(|w| w == b"/Type /Page\n")
            .count()
            + pdf
                .windows(b"/Type/Page/".len())
                .filter(|w| w == b"/Type/Page/")
                .count();
        let _ = pages;
        if let Some(out) = std::env::var_os("MUSUBI_PDF_SAMPLE") {
            std::fs::write(out, &pdf).expect("write the sample");
        }
        // An empty plan renders too (one page per sheet).
        render(&CarePlan::default(), &font).expect("render an empty plan");
    }

    #[test]
    fn a_long_referral_letter_flows_onto_more_pages() {
        use musubi_crdt::documents::referral::Patient;
        let font = find_font().expect("a Japanese font (apt-get install fonts-ipaexfont-gothic)");
        let letter = ReferralLetter {
            to_facility: "東京第一テスト病院".to_owned(),
            to_doctor: "循環器内科 野口 英世丸".to_owned(),
            from_facility: "港診療所".to_owned(),
            from_doctor: "大河内 勘三郎".to_owned(),
            patient: Patient {
                name: "田中 太郎".to_owned(),
                sex: "男".to_owned(),
                birth_date: "1955-05-04".to_owned(),
                ..Patient::default()
            },
            progress: "血圧の経過。".repeat(400),
            ..ReferralLetter::default()
        };
        let short = render_referral(
            &ReferralLetter {
                progress: String::new(),
                ..letter.clone()
            },
            "2024-05-01",
            &font,
        )
        .expect("render");
        let long = render_referral(&letter, "2024-05-01", &font).expect("render");
        // The page tree's `/Count N` (krilla writes one page tree).
        let pages = |pdf: &[u8]| -> usize {
            let at = pdf
                .windows(b"/Count ".len())
                .position(|w| w == b"/Count ")
                .expect("a page tree");
            pdf[at + b"/Count ".len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0, |n, b| n * 10 + usize::from(b - b'0'))
        };
        assert!(short.starts_with(b"%PDF-") && long.starts_with(b"%PDF-"));
        assert_eq!(pages(&short), 1, "a short letter is one page");
        assert!(pages(&long) >= 2, "a long 症状経過 continues on 続紙");
        render_referral(&ReferralLetter::default(), "", &font).expect("a blank form renders");
    }

    #[test]
    fn ages_on_the_letter_date() {
        assert_eq!(age_on("1955-05-04", "2024-05-01"), Some(68));
        assert_eq!(age_on("1955-05-04", "2024-05-04"), Some(69));
        assert_eq!(age_on("", "2024-05-04"), None);
        assert_eq!(age_on("2030-01-01", "2024-05-04"), None);
    }

    #[test]
    fn japanese_dates_and_wrapping() {
        assert_eq!(jdate("2025-04-01"), "2025年4月1日");
        assert_eq!(jdate(""), "　　年　　月　　日");
        let width = |s: &str| s.chars().count() as f32;
        assert_eq!(wrap_with(width, "あいうえお", 2.0), ["あい", "うえ", "お"]);
        assert_eq!(
            wrap_with(width, "あい。う", 2.0),
            ["あい。", "う"],
            "closing punctuation hangs"
        );
        assert_eq!(wrap_with(width, "a\nb", 5.0), ["a", "b"]);
        assert_eq!(
            wrap_with(width, "2025-04-01〜2025-09-30", 12.0),
            ["2025-04-01〜", "2025-09-30"],
            "a date range breaks at the wave dash"
        );
    }

    #[test]
    fn a_missing_font_names_the_package_to_install() {
        let err = PdfError::FontMissing {
            tried: "x".to_owned(),
        };
        assert!(
            err.to_string()
                .contains("apt-get install fonts-ipaexfont-gothic")
        );
        let err = JapaneseFont::load(Path::new("/nonexistent/font.ttf"), 0)
            .err()
            .expect("no such file");
        assert!(err.to_string().contains("/nonexistent/font.ttf"), "{err}");
    }
}
