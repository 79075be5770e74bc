// Turning a failure into a sentence that tells the user what to do.

import { toFailure } from './api';
import { t } from './i18n.svelte';

/** A sentence in the current language saying what to do about `e` (chosen by its `kind`). */
export function errorText(e: unknown): string {
  return t(`error.${toFailure(e).kind}`);
}

/** The engine's English detail of `e`, to show below the sentence (empty when there is none). */
export function errorDetail(e: unknown): string {
  return toFailure(e).message;
}
