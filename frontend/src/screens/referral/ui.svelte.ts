// What the referral screen remembers while the user moves between the list and a letter.

import type { Direction } from '$lib/api';

export const ui = $state<{
  /** The list tab shown: 受信箱 or 送信箱. */
  tab: Direction;
  /** The letter opened last (its row gets the focus back on returning to the list). */
  lastOpened: string | null;
  /** A sentence to announce once on the next screen (after importing, for example). */
  notice: string | null;
}>({ tab: 'inbox', lastOpened: null, notice: null });
