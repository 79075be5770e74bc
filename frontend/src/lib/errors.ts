// Turning a failure into a sentence that tells the user what to do.

import { toFailure } from './api';
import { has, t } from './i18n.svelte';

/**
 * A sentence in the current language saying what to do about `e` (chosen by its `kind`; one that
 * names how long to wait or how many tries are left when the engine said so).
 */
export function errorText(e: unknown): string {
  const f = toFailure(e);
  if (f.retryAfterS !== null && has(`error.${f.kind}.wait`)) {
    return t(`error.${f.kind}.wait`, { s: f.retryAfterS });
  }
  if (f.triesLeft !== null && has(`error.${f.kind}.tries`)) {
    return t(`error.${f.kind}.tries`, { n: f.triesLeft });
  }
  return t(`error.${f.kind}`);
}

/** The engine's English detail of `e`, to show below the sentence (empty when there is none). */
export function errorDetail(e: unknown): string {
  return toFailure(e).message;
}
