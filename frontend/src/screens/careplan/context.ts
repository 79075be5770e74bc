// What every part of an open plan needs: its id, the saver, reloading, and whether it is read-only.

import { getContext, setContext } from 'svelte';
import type { Saver } from './saver.svelte';

export interface PlanContext {
  /** The plan's id. */
  readonly id: string;
  /** Where edits go. */
  readonly saver: Saver;
  /** Whether the plan shown is a past version (nothing can be changed). */
  readonly readonly: boolean;
  /** Reads the plan again from the engine. */
  reload(): Promise<void>;
  /** Says `text` to screen readers (moves, additions, removals). */
  announce(text: string): void;
}

const KEY = Symbol('careplan');

export function setPlanContext(ctx: PlanContext) {
  setContext(KEY, ctx);
}

export function planContext(): PlanContext {
  const ctx = getContext<PlanContext | undefined>(KEY);
  if (!ctx) throw new Error('planContext() outside an open plan');
  return ctx;
}
