// Every word exists in both languages (runs in Node; no page).
import { test, expect } from '@playwright/test';
import common from '../src/lib/i18n/common';
import session from '../src/lib/i18n/session';
import settings from '../src/lib/i18n/settings';
import referral from '../src/lib/i18n/referral';
import careplan from '../src/lib/i18n/careplan';
import reception from '../src/lib/i18n/reception';
import hq from '../src/lib/i18n/hq';

const areas: Record<string, { ja: Record<string, string>; en: Record<string, string> }> = {
  common, session, settings, referral, careplan, reception, hq,
};

for (const [area, d] of Object.entries(areas)) {
  test(`${area}: every key has both Japanese and English`, () => {
    const ja = Object.keys(d.ja).sort();
    const en = Object.keys(d.en).sort();
    expect(ja.filter((k) => !(k in d.en)), 'keys missing in English').toEqual([]);
    expect(en.filter((k) => !(k in d.ja)), 'keys missing in Japanese').toEqual([]);
    for (const k of ja) {
      expect(d.ja[k].trim(), `${k} (ja) is empty`).not.toBe('');
      expect(d.en[k].trim(), `${k} (en) is empty`).not.toBe('');
    }
  });
}

test('no key is defined by two areas', () => {
  const seen = new Map<string, string>();
  const dupes: string[] = [];
  for (const [area, d] of Object.entries(areas)) {
    for (const k of Object.keys(d.ja)) {
      if (seen.has(k)) dupes.push(`${k} (${seen.get(k)} and ${area})`);
      seen.set(k, area);
    }
  }
  expect(dupes).toEqual([]);
});
