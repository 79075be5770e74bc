// Reception helpers shared by the desk's components (and HQ's 要配慮 columns): care flags in form
// order, presence words, birth dates typed the way a reception desk types them, head counts.

import type { CardKind, CareFlag, Method, Presence } from '$lib/api';

/** Every 要配慮 flag, in the order of the paper form. */
export const CARE_FLAGS: readonly CareFlag[] = [
  'elderly',
  'disability',
  'infant',
  'pregnant',
  'foreigner',
  'care-needed',
  'medical-care',
  'food-allergy',
];

/** Orders flags as the form does. */
export function sortFlags(flags: readonly CareFlag[]): CareFlag[] {
  return CARE_FLAGS.filter((f) => flags.includes(f));
}

/** The i18n key of a flag's word (`reception.flag.care-needed`). */
export function flagKey(f: CareFlag | string): string {
  return `reception.flag.${f}`;
}

/** The i18n key of a presence word (在所 / 外泊 / 退所). */
export function presenceKey(p: Presence): string {
  return `reception.presence.${p}`;
}

/** How a tapped card identifies the person on the stay event. */
export function methodOfCard(kind: CardKind): Method {
  return kind === 'my_number' ? 'my-number-card' : 'transit-card';
}

const ERAS: { names: string[]; start: number; first: [number, number, number] }[] = [
  { names: ['令和', '令', 'r'], start: 2018, first: [2019, 5, 1] },
  { names: ['平成', '平', 'h'], start: 1988, first: [1989, 1, 8] },
  { names: ['昭和', '昭', 's'], start: 1925, first: [1926, 12, 25] },
  { names: ['大正', '大', 't'], start: 1911, first: [1912, 7, 30] },
  { names: ['明治', '明', 'm'], start: 1867, first: [1868, 1, 25] },
];

function toHalfWidth(s: string): string {
  return s.normalize('NFKC');
}

function valid(y: number, m: number, d: number): boolean {
  if (!(m >= 1 && m <= 12 && d >= 1 && d <= 31 && y >= 1868)) return false;
  const dt = new Date(Date.UTC(y, m - 1, d));
  return dt.getUTCFullYear() === y && dt.getUTCMonth() === m - 1 && dt.getUTCDate() === d;
}

function iso(y: number, m: number, d: number): string {
  return `${String(y).padStart(4, '0')}-${String(m).padStart(2, '0')}-${String(d).padStart(2, '0')}`;
}

/**
 * A birth date as typed at a desk, as `YYYY-MM-DD`, or null when it is not a date:
 * `1950-01-02`, `1950/1/2`, `1950.1.2`, `19500102`, `1950年1月2日`, and 和暦 such as
 * `昭和25年1月2日`, `S25.1.2`, `s25/1/2`, `平成元年4月1日`.
 */
export function parseBirthDate(input: string): string | null {
  const s = toHalfWidth(input).trim().toLowerCase().replace(/\s+/g, '');
  if (s === '') return null;
  let m = /^(\d{4})(\d{2})(\d{2})$/.exec(s);
  if (m) {
    const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
    return valid(y, mo, d) ? iso(y, mo, d) : null;
  }
  m = /^(\d{4})[-/.年](\d{1,2})[-/.月](\d{1,2})日?$/.exec(s);
  if (m) {
    const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
    return valid(y, mo, d) ? iso(y, mo, d) : null;
  }
  for (const era of ERAS) {
    for (const name of era.names) {
      if (!s.startsWith(name)) continue;
      const rest = s.slice(name.length);
      m = /^(元|\d{1,2})[-/.年](\d{1,2})[-/.月](\d{1,2})日?$/.exec(rest);
      if (!m) continue;
      const ey = m[1] === '元' ? 1 : Number(m[1]);
      const [y, mo, d] = [era.start + ey, Number(m[2]), Number(m[3])];
      if (!valid(y, mo, d)) return null;
      const [fy, fm, fd] = era.first;
      if (iso(y, mo, d) < iso(fy, fm, fd)) return null;
      return iso(y, mo, d);
    }
  }
  return null;
}

/** Whether `s` is written in kana only (so it can go in the かな field as well). */
export function isKana(s: string): boolean {
  const t = s.replace(/[\s\u3000]/g, '');
  return t.length > 0 && /^[\u3041-\u3096\u30a1-\u30fa\u30fc\u30fb\u309d\u309e\u30fd\u30feｦ-ﾟ]+$/.test(t);
}

/** A well-formed e-mail address, as far as a form can tell. */
export function isEmail(s: string): boolean {
  return /^[^\s@]+@[^\s@]+\.[^\s@]+$/.test(s.trim());
}

/** Share of capacity in percent (null when no capacity is stated). */
export function occupancy(present: number, capacity: number): number | null {
  return capacity > 0 ? (present / capacity) * 100 : null;
}

/** The warning level of a head count: over capacity, at ≥ 90 % of it, else ok (no capacity: ok). */
export function occupancyLevel(present: number, capacity: number): 'ok' | 'near' | 'over' {
  if (capacity <= 0) return 'ok';
  if (present > capacity) return 'over';
  if (present * 10 >= capacity * 9) return 'near';
  return 'ok';
}
