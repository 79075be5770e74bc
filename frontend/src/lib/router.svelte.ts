// Hash routing: `#/referral`, `#/careplan/123`, ... The first segment picks the screen; screens
// may use the rest (`router.rest`) for their own sub-pages and call `navigate` to move.

export const SECTIONS = ['referral', 'careplan', 'reception', 'hq', 'settings'] as const;
export type Section = (typeof SECTIONS)[number];
export const DEFAULT_SECTION: Section = 'referral';

function parse(hash: string): string[] {
  return hash
    .replace(/^#\/?/, '')
    .split('/')
    .filter((s) => s.length > 0)
    .map((s) => decodeURIComponent(s));
}

const state = $state<{ segments: string[] }>({
  segments: typeof location === 'undefined' ? [] : parse(location.hash),
});

if (typeof window !== 'undefined') {
  window.addEventListener('hashchange', () => {
    state.segments = parse(location.hash);
  });
}

/** The current route (reactive). */
export const router = {
  /** The section (first segment), or null when the hash names none. */
  get section(): string | null {
    return state.segments[0] ?? null;
  },
  /** The segments after the section (`#/careplan/123/edit` → `['123', 'edit']`). */
  get rest(): string[] {
    return state.segments.slice(1);
  },
  /** The whole path, `/careplan/123`. */
  get path(): string {
    return '/' + state.segments.map(encodeURIComponent).join('/');
  },
};

/** The href for a path (`href('careplan', id)` → `#/careplan/<id>`). */
export function href(...segments: string[]): string {
  return '#/' + segments.map(encodeURIComponent).join('/');
}

/** Moves to a path (`navigate('careplan', id)`). */
export function navigate(...segments: string[]) {
  location.hash = href(...segments);
}
