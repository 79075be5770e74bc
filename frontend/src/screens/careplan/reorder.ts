// Moving an item among its siblings: the placement for "one up / one down", and the drag in progress.

import type { PlacementInput } from '$lib/api';

/** The placement that moves `id` one step (`-1` up, `1` down) among `siblings`; null at an end. */
export function stepPlacement(siblings: readonly string[], id: string, step: -1 | 1): PlacementInput | null {
  const i = siblings.indexOf(id);
  const j = i + step;
  if (i < 0 || j < 0 || j >= siblings.length) return null;
  return step < 0 ? { before: siblings[j] } : { after: siblings[j] };
}

/** Where `id` ends up among `siblings` after `placement` (its new index). */
function placedIndex(siblings: readonly string[], id: string, placement: PlacementInput): number {
  const rest = siblings.filter((s) => s !== id);
  if (placement === 'first') return 0;
  if (placement === 'last') return rest.length;
  if ('before' in placement) return Math.max(0, rest.indexOf(placement.before));
  return rest.indexOf(placement.after) + 1;
}

/** Reorders `list` (items with an `id`) in place as `placement` says; returns the new index. */
export function applyPlacement<T extends { id: string }>(list: T[], id: string, placement: PlacementInput): number {
  const from = list.findIndex((x) => x.id === id);
  if (from < 0) return -1;
  const to = placedIndex(
    list.map((x) => x.id),
    id,
    placement,
  );
  const [item] = list.splice(from, 1);
  list.splice(to, 0, item);
  return to;
}

/** The item being dragged with the mouse, and the sibling group it may be dropped in. */
export const drag: { current: { id: string; group: string } | null } = { current: null };
