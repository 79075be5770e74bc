// The referral screen's plain helpers: the form's fields in paper order, their words, dates,
// sizes and reading picked files. No engine calls and no reactive state here.

import type { LetterSummary, Patient, ReferralField, ReferralLetter, StatusTimes } from '$lib/api';
import { toMs } from '$lib/dates';
import { has, t } from '$lib/i18n.svelte';

/** Largest attachment the engine takes (`ATTACHMENT_BYTES_MAX`, 8 MiB). */
export const ATTACHMENT_BYTES_MAX = 8 * 1024 * 1024;

/** Largest FHIR Bundle the engine imports (`FHIR_SOURCE_BYTES_MAX`, 4 MiB). */
export const FHIR_BYTES_MAX = 4 * 1024 * 1024;

/** How long after the last keystroke an edit is sent to the engine. */
export const EDIT_DEBOUNCE_MS = 400;

/** The free-text sections of 様式11 below the patient block, in the paper form's order. */
export const BODY_FIELDS = [
  'diagnosis',
  'purpose',
  'history',
  'progress',
  'treatment',
  'prescription',
  'remarks',
] as const satisfies readonly ReferralField[];

/** Every field the editor shows (the reply is handled on its own). */
export const FORM_FIELDS: readonly ReferralField[] = [
  'to_facility',
  'to_doctor',
  'from_facility',
  'from_doctor',
  'patient.name',
  'patient.kana',
  'patient.sex',
  'patient.birth_date',
  'patient.address',
  'patient.phone',
  'patient.occupation',
  ...BODY_FIELDS,
];

/** 性別 as the paper form offers it (the engine's FHIR export accepts exactly these). */
export const SEXES = ['男', '女', 'その他', '不明'] as const;

/** The values of every field (form fields and the reply), keyed by field. */
export type Values = Record<ReferralField, string>;

/** The text of `field` in `letter`. */
function fieldOf(letter: ReferralLetter, field: ReferralField): string {
  if (field.startsWith('patient.')) return letter.patient[field.slice('patient.'.length) as keyof Patient] ?? '';
  return (letter as unknown as Record<string, string>)[field] ?? '';
}

/** All field values of `letter`. */
export function valuesOf(letter: ReferralLetter): Values {
  const v = {} as Values;
  for (const f of [...FORM_FIELDS, 'reply' as const]) v[f] = fieldOf(letter, f);
  return v;
}

/** A DOM id for a field's input (`referral-f-patient-name`). */
export function inputId(field: ReferralField): string {
  return 'referral-f-' + field.replace(/[._]/g, '-');
}

/** The dictionary key of a field's label (`referral.field.patient.name`). */
export function labelKey(field: ReferralField): string {
  return `referral.field.${field}`;
}

/** The time of the latest status a letter reached (RFC 3339), or null. */
function latestTime(times: StatusTimes): string | null {
  return times.replied_at ?? times.received_at ?? times.sent_at ?? times.created_at ?? null;
}

/** The date written on a letter: when it was sent, else when it was written (now, before either). */
export function letterMs(times: StatusTimes | undefined): number {
  return toMs(times?.sent_at ?? times?.created_at) ?? Date.now();
}

/** The date a list row shows: when the letter last moved on. */
export function rowMs(s: LetterSummary): number | null {
  return toMs(latestTime(s.times));
}

/** A birth date as written on the form: `1955年5月4日（昭和30年）` in Japanese, `4 May 1955` in English. */
export function birthText(birth: string, lang: 'ja' | 'en'): string {
  const m = /^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$/.exec(birth.trim());
  if (!m) return birth;
  const [y, mo, d] = [Number(m[1]), m[2] ? Number(m[2]) : null, m[3] ? Number(m[3]) : null];
  if (lang === 'en') {
    if (mo === null) return String(y);
    const date = new Date(y, mo - 1, d ?? 1);
    return new Intl.DateTimeFormat('en-GB', d === null ? { year: 'numeric', month: 'long' } : { dateStyle: 'long' }).format(date);
  }
  let text = `${y}年`;
  if (mo !== null) text += `${mo}月`;
  if (d !== null) text += `${d}日`;
  if (mo !== null && d !== null) {
    try {
      const era = new Intl.DateTimeFormat('ja-JP-u-ca-japanese', { era: 'long', year: 'numeric' }).format(
        new Date(y, mo - 1, d),
      );
      if (era && !era.startsWith(String(y))) text += `（${era}）`;
    } catch {
      // No Japanese calendar in this engine: the western year is enough.
    }
  }
  return text;
}

/** 性別 in the current language (the stored value is the form's Japanese word; others as they are). */
export function sexLabel(s: string): string {
  return s && has(`referral.sex.${s}`) ? t(`referral.sex.${s}`) : s;
}

/** A size in bytes as people read it (`512 B`, `38 KB`, `2.4 MB`). */
export function sizeText(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${Math.round(bytes / 1024)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

/** A picked file's content as standard base64 (without the `data:` prefix). */
export function readBase64(file: Blob): Promise<string> {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onerror = () => reject(r.error ?? new Error('the file could not be read'));
    r.onload = () => {
      const url = String(r.result ?? '');
      const comma = url.indexOf(',');
      resolve(comma >= 0 ? url.slice(comma + 1) : '');
    };
    r.readAsDataURL(file);
  });
}

/** A picked file's content as text (UTF-8). */
export function readText(file: Blob): Promise<string> {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onerror = () => reject(r.error ?? new Error('the file could not be read'));
    r.onload = () => resolve(String(r.result ?? ''));
    r.readAsText(file, 'utf-8');
  });
}

/** What a quick look at a FHIR file finds wrong before the engine sees it, or null when it may be a Bundle. */
export function fhirProblem(text: string): 'notJson' | 'notBundle' | null {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text.replace(/^\uFEFF/, ''));
  } catch {
    return 'notJson';
  }
  if (typeof parsed !== 'object' || parsed === null || (parsed as { resourceType?: unknown }).resourceType !== 'Bundle') {
    return 'notBundle';
  }
  return null;
}

/** A name safe to offer as a file name (no path separators or characters Windows refuses). */
export function safeFileName(name: string, fallback: string): string {
  const s = name.replace(/[\\/:*?"<>|\r\n\t]+/g, '').trim();
  return s || fallback;
}
