// The UI's language and its words. Japanese is the default; the choice is kept in localStorage.
//
// Dictionaries live per area in `./i18n/*.ts`, each `export default { ja: {...}, en: {...} }`
// with keys namespaced by area (`referral.inbox`). `t(key, params)` replaces `{name}` in the text.

import common from './i18n/common';
import session from './i18n/session';
import settings from './i18n/settings';
import referral from './i18n/referral';
import careplan from './i18n/careplan';
import reception from './i18n/reception';
import hq from './i18n/hq';
import audit from './i18n/audit';

export type Lang = 'ja' | 'en';

/** A dictionary file's shape. */
export type Dictionary = { ja: Record<string, string>; en: Record<string, string> };

const areas: Dictionary[] = [common, session, settings, referral, careplan, reception, hq, audit];

const words: Record<Lang, Record<string, string>> = {
  ja: Object.assign({}, ...areas.map((a) => a.ja)),
  en: Object.assign({}, ...areas.map((a) => a.en)),
};

const STORAGE_KEY = 'musubi.lang';

function stored(): Lang {
  try {
    const v = localStorage.getItem(STORAGE_KEY);
    return v === 'en' || v === 'ja' ? v : 'ja';
  } catch {
    return 'ja';
  }
}

const state = $state<{ lang: Lang }>({ lang: stored() });

function apply(l: Lang) {
  if (typeof document !== 'undefined') document.documentElement.lang = l;
}
apply(state.lang);

/** The current language (reactive). Assign `i18n.lang` or call `setLang` to switch. */
export const i18n = {
  get lang(): Lang {
    return state.lang;
  },
  set lang(l: Lang) {
    setLang(l);
  },
};

/** Switches the UI language and remembers it. */
export function setLang(l: Lang) {
  state.lang = l;
  apply(l);
  try {
    localStorage.setItem(STORAGE_KEY, l);
  } catch {
    // Storage may be unavailable; the choice then lasts for this session only.
  }
}

export type Params = Record<string, string | number>;

/**
 * The text for `key` in the current language, with `{name}` replaced from `params`.
 * Falls back to Japanese, then to the key itself (so a missing word is visible, not blank).
 */
export function t(key: string, params?: Params): string {
  const text = words[state.lang][key] ?? words.ja[key] ?? key;
  if (!params) return text;
  return text.replace(/\{(\w+)\}/g, (m, name: string) =>
    name in params ? String(params[name]) : m,
  );
}

/** Whether `key` has a word in the current language. */
export function has(key: string): boolean {
  return key in words[state.lang];
}

/** A time of day as HH:MM (24-hour, both languages), from milliseconds since the epoch. */
export function formatTime(ms: number): string {
  const d = new Date(ms);
  return `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`;
}

/** A date and time in the current language's usual form (2025年1月9日 14:05 / 9 Jan 2025, 14:05). */
export function formatDateTime(ms: number): string {
  const locale = state.lang === 'ja' ? 'ja-JP' : 'en-GB';
  return new Intl.DateTimeFormat(locale, {
    year: 'numeric',
    month: 'short',
    day: 'numeric',
    hour: '2-digit',
    minute: '2-digit',
    hour12: false,
  }).format(new Date(ms));
}

/** A date in the current language's usual form. */
export function formatDate(ms: number): string {
  const locale = state.lang === 'ja' ? 'ja-JP' : 'en-GB';
  return new Intl.DateTimeFormat(locale, { year: 'numeric', month: 'short', day: 'numeric' }).format(
    new Date(ms),
  );
}
