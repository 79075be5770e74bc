// The form's choices in the UI's language: Japanese shows the form's own words; English adds a gloss.

import { i18n, t } from '$lib/i18n.svelte';
import type { Weekday } from '$lib/api';

/** The label of a choice value (`level`, `certification`, `housework`, `sex`) in the UI's language. */
export function choiceLabel(kind: string, value: string): string {
  if (!value) return '';
  if (i18n.lang === 'ja') return value;
  const key = `careplan.choice.${kind}.${value}`;
  const word = t(key);
  return word === key ? value : `${value} (${word})`;
}

/** 月 … 日 / Mon … Sun. */
export function dayShort(d: Weekday): string {
  return t(`careplan.day.${d}`);
}

/** 月曜日 … 日曜日 / Monday … Sunday. */
export function dayLong(d: Weekday): string {
  return t(`careplan.dayLong.${d}`);
}
