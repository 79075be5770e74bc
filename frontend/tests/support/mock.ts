// The engine, mocked at the IPC boundary, for Playwright tests of the built UI.
//
// The page gets a fake `window.__TAURI_INTERNALS__` (what `@tauri-apps/api` v2 calls): `invoke`
// sends each command to handlers that run here in Node (via `page.exposeFunction`), so a test can
// keep state and assert on the calls; `plugin:event|listen`/`unlisten` are served in the page so
// `emit(page, 'sync-status', payload)` reaches the generated `events.syncStatus.listen` callbacks.
//
// Usage (a screen test only adds its own commands; session, sync and settings have defaults):
//
//   import { test, expect } from '@playwright/test';
//   import { openApp, fail } from './support/mock';
//
//   test('a clerk sees the inbox', async ({ page }) => {
//     const app = await openApp(page, {
//       list_referrals: () => [{ id: 'r1', patient: '能登 太郎' }],
//       open_referral: ({ id }) => (id === 'r1' ? { id } : fail('not_found', 'no such letter')),
//     }, { path: '#/referral' });
//     await expect(page.getByText('能登 太郎')).toBeVisible();
//     await app.emit('document-changed', { id: 'r1', kind: 'referral' });
//     expect(app.callsTo('list_referrals')).toHaveLength(2);
//   });

import type { Page } from '@playwright/test';
import type {
  AppStatus,
  AuditAction,
  AuditChainView,
  AuditEntryView,
  AuditPage,
  AuditQuery,
  AuditReviewView,
  AuditVerdict,
  CardKind,
  CardStatus,
  DeviceInvite,
  ErrorKind,
  FacilityChoice,
  FacilityDevice,
  FacilityRole,
  FacilityTrust,
  IdleLockSetting,
  InvitePreview,
  JoinAnswer,
  Settings,
  Staff,
  StaffRole,
  SyncStatus,
  TrustDirectory,
} from '../../src/lib/bindings';

/** The phases `appStatus()` reports. */
export type Phase = AppStatus['phase'];

/** An IPC error as the engine sends it. */
export interface MockError {
  kind: ErrorKind;
  message: string;
  retry_after_s?: number | null;
  tries_left?: number | null;
}

/**
 * A card on the mocked reader, as `sign_in_card` reads it. A My Number card checks its own PIN
 * (`pin`, 4 digits; `tries` left, 3 when new, and never sent with only one left); a contactless
 * card has the staff PIN bound with it (`pin`, 4 to 8 digits, locked after 5 wrong in a row).
 */
export interface MockCard {
  kind: CardKind;
  /** The account it is bound to (null: no account of this device has it). */
  login: string | null;
  pin: string;
  /** My Number card: tries left of its PIN. */
  tries?: number;
}

/** A recorded command call (args as the page sent them, camelCase keys). */
export interface Call {
  cmd: string;
  args: Record<string, any>;
}

/**
 * Answers one command: returns the command's data (a value or a promise; `undefined` is sent as
 * null), or throws `{ kind, message }` (see `fail`) to make the command return an error result.
 */
export type Handler = (args: Record<string, any>, app: MockApp) => unknown;

/** Handlers by command name: the Rust name (`create_facility`) or the TS name (`createFacility`). */
export type Handlers = Record<string, Handler>;

/** An invite code the mocked engine knows: what it reads as, and how joining with it goes. */
export interface MockInvite extends InvitePreview {
  /** How many `join` calls answer "pending" before the join completes (default 0: at once). */
  pending?: number;
  /** The error every `join` with this code gets (used, unknown at the relay). */
  refuse?: MockError;
}

/** The mocked engine's state that the default handlers read and change. */
export interface MockState {
  phase: Phase;
  facility_name: string | null;
  facility_role: FacilityRole | null;
  /** The signed-in staff member. */
  staff: Staff | null;
  /** All staff accounts. */
  staff_list: Staff[];
  /** Passwords by login (for `sign_in`). */
  passwords: Record<string, string>;
  /** Wrong passwords in a row, by login: from the fifth on, `sign_in` answers `sign_in_locked`
   * (the engine pauses sign-in for 30 s, then longer). */
  failed_sign_ins: Record<string, number>;
  /** The passphrase `unlock` accepts. */
  passphrase: string;
  /**
   * Invite codes `invite_preview` and `join` know, by code. When empty, any code starting with
   * `musubi2` reads as an invite for a new facility (this one, a clinic) that joins at once.
   */
  invites: Record<string, MockInvite>;
  sync: SyncStatus;
  settings: Settings;
  facilities: FacilityChoice[];
  /** This facility's computers (`facility_devices`). */
  devices: FacilityDevice[];
  /** The verified directory (`trust_directory`). */
  trust: TrustDirectory;
  /**
   * The safety numbers of new root keys, by facility id: what the facility would read out by
   * phone, and what `confirm_root` accepts for a `root_changed` facility.
   */
  new_safety_numbers: Record<string, string>;
  /** Device invites made (`device_invite`). */
  device_invites: DeviceInvite[];
  data_dir: string;
  /** Whether the signed-in staff member's session is locked. */
  locked: boolean;
  /** When the signed-in staff member's last command ran (ms since the epoch). */
  last_active_ms: number;
  /** The idle lock in force. */
  idle_lock: IdleLockSetting;
  /** The audit log, oldest first (the default handlers record as the engine does). */
  audit: AuditEntryView[];
  /** A tampered log: what `audit_verify` finds in this device's chain (null: intact). */
  audit_broken: { seq: number; reason: string } | null;
  /** The facility's other devices' chains as the audit document holds them (default: none). */
  audit_chains: AuditChainView[];
  /** The card on the reader (null: none), and what the card task last reported. */
  card: MockCard | null;
  card_status: CardStatus;
  /** How long `sign_in_card` waits for a card, in ms (the engine waits 20 s). */
  card_wait_ms: number;
  /** Wrong staff PINs in a row, by login (a password sign-in clears them). */
  failed_pins: Record<string, number>;
  /** Whether this device requires 二要素認証 (a password alone signs no one in). */
  two_factor: boolean;
}

export interface OpenOptions {
  /** Where the app stands at start. Default `ready`. */
  phase?: Phase;
  /** Whether this computer has joined a deployment (default: unless `new` or `not_joined`). */
  joined?: boolean;
  /** The signed-in staff member when ready (default 山田 花子, login `yamada`). */
  staff?: Staff;
  /** Staff accounts (default: the signed-in one; empty for `new`/`not_joined`/`no_staff`). */
  staffList?: Staff[];
  /** Passwords by login (default: `yamada` → `password123`). */
  passwords?: Record<string, string>;
  /** The passphrase `unlock` accepts (default `correct horse battery`). */
  passphrase?: string;
  /** This facility (default 七尾市立診療所, a clinic). */
  facility?: { name?: string; role?: FacilityRole; id?: string };
  /** Sync status at start (default online, nothing pending). */
  sync?: Partial<SyncStatus>;
  /** Settings fields to override. */
  settings?: Partial<Settings>;
  /** The deployment's facilities (default: this one and three others, one per role). */
  facilities?: FacilityChoice[];
  /** This facility's computers (default: this one and the reception's second laptop). */
  devices?: FacilityDevice[];
  /** The verified directory (default: `facilities`, all verified, with made-up safety numbers). */
  trust?: Partial<TrustDirectory>;
  /** Invite codes the engine knows (default: none, so any `musubi2...` code joins at once). */
  invites?: Record<string, MockInvite>;
  /** UI language stored before the app starts (default: none stored, so Japanese). */
  lang?: 'ja' | 'en';
  /** The hash route to open, e.g. `#/careplan` (default: none, so the first screen). */
  path?: string;
  /** Whether to wait for the first screen after loading (default true). */
  waitReady?: boolean;
  /** The idle time before a session locks, in ms (default 10 minutes). */
  idleLockMs?: number;
  /** Whether MUSUBI_IDLE_LOCK_SECS fixes it (default false). */
  idleLockFixed?: boolean;
  /** Whether this device requires 二要素認証 (default false). */
  twoFactor?: boolean;
  /** The audit log at start (oldest first; `seq` is renumbered per device). */
  audit?: Omit<AuditEntryView, 'seq'>[];
}

/** The mocked engine of one page. */
export interface MockApp {
  readonly page: Page;
  /** The state the default handlers use; tests may read and change it. */
  readonly state: MockState;
  /** Every command called so far, in order (event plumbing excluded). */
  readonly calls: Call[];
  /** Commands called that had no handler (each also answered with an `internal` error). */
  readonly unhandled: string[];
  /** The args of each call to `cmd` (Rust or TS name). */
  callsTo(cmd: string): Record<string, any>[];
  /** Sends a typed event to the page (waits until the page listens to it). */
  emit(event: string, payload: unknown): Promise<void>;
  /** Sets the sync status and sends it as the `sync-status` event. */
  setSync(s: Partial<SyncStatus>): Promise<void>;
  /** Replaces or adds handlers. */
  handle(handlers: Handlers): void;
}

/** Event names (tauri-specta's kebab-case of the Rust type names). */
export const EVENTS = {
  syncStatus: 'sync-status',
  documentChanged: 'document-changed',
  cardTapped: 'card-tapped',
} as const;

/** Throws the IPC error `{ kind, message }` from a handler. */
export function fail(kind: ErrorKind, message = `${kind} (mocked)`): never {
  throw { kind, message } satisfies MockError;
}

/** A promise with its resolve exposed: hold a handler until the test lets it go. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** Waits `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** 2025-01-09 14:05 in Japan (the tests run in Asia/Tokyo). */
export const LAST_SYNC_MS = Date.UTC(2025, 0, 9, 5, 5);

export const DEFAULT_STAFF: Staff = { id: 'staff-1', login: 'yamada', name: '山田 花子', role: 'admin', card: null };
/** A colleague without administrator rights. */
export const OTHER_STAFF: Staff = { id: 'staff-2', login: 'tanaka', name: '田中 次郎', role: 'staff', card: null };

/** The idle lock as the engine applies it: touches every quarter of the idle time, at most 30 s. */
export function idleLockOf(idleMs: number, fixed = false): IdleLockSetting {
  return { idle_ms: idleMs, touch_every_ms: Math.min(30_000, idleMs / 4), fixed };
}

/** How long after its last command the engine locks a session itself (the idle time, a touch, 5 s). */
export function idleLimitMs(l: IdleLockSetting): number {
  return l.idle_ms + l.touch_every_ms + 5_000;
}
export const DEFAULT_FACILITY_ID = '0194a3c2-7d1e-7c3a-9f00-0000000000c1';
/** The certification authority's fingerprint the default invites and directory name. */
export const AUTHORITY_FINGERPRINT = '40213 88710 05126 93384 71502 66049';
/** This device's id and fingerprint (as `settings` reports them). */
export const THIS_DEVICE_ID = '12D3KooWQm7zNfVhd3Lq5oZ6x2cYvM9t4kP8rW1sBaE3uJn5GhXy';
export const THIS_DEVICE_FINGERPRINT = '3f2a 91c0 5be7 0d44 a1f9 7c3e 28b6 e05d';
/** The reception's second laptop in the default device list. */
export const OTHER_DEVICE_ID = '12D3KooWLaptop2ReceptionNanaoClinic00000000000000000';
export const OTHER_DEVICE_FINGERPRINT = '9c41 07d2 e88a 1f30 5b6c d903 47ae 21f5';

/** A made-up safety number (30 digits in six groups of five) for a facility id. */
export function safetyNumberOf(id: string): string {
  let h = 2166136261;
  const out: string[] = [];
  for (let g = 0; g < 6; g++) {
    for (const c of `${id}/${g}`) h = Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0;
    out.push(String(h % 100000).padStart(5, '0'));
  }
  return out.join(' ');
}

/** Only the digits of a typed safety number (full-width digits read as digits), as the shell does. */
export function safetyDigits(typed: string): string {
  return [...typed]
    .map((c) => (c >= '０' && c <= '９' ? String.fromCharCode(c.charCodeAt(0) - 0xfee0) : c))
    .filter((c) => c >= '0' && c <= '9')
    .join('');
}

function snake(cmd: string): string {
  return cmd.includes('|') ? cmd : cmd.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase());
}

function isMockError(e: unknown): e is MockError {
  return typeof e === 'object' && e !== null && typeof (e as MockError).kind === 'string' && !(e instanceof Error);
}

function initialState(o: OpenOptions): MockState {
  const phase = o.phase ?? 'ready';
  const staff = o.staff ?? DEFAULT_STAFF;
  // A locked computer has usually joined already (set `joined: false` for one that has not).
  const joined = o.joined ?? (phase !== 'new' && phase !== 'not_joined');
  const staffList = o.staffList ?? (phase === 'ready' || phase === 'signed_out' || phase === 'locked' ? [staff] : []);
  const name = o.facility?.name ?? '七尾市立診療所';
  const role = o.facility?.role ?? 'clinic';
  const id = o.facility?.id ?? DEFAULT_FACILITY_ID;
  const data_dir = '/home/clerk/.local/share/musubi';
  const sync: SyncStatus = {
    state: joined ? 'online' : 'not_joined',
    pending: 0,
    last_sync_ms: joined ? LAST_SYNC_MS : null,
    lan_peers: 0,
    message: null,
    relay_behind: null,
    quarantined: [],
    quarantined_total: 0,
    held_back: 0,
    ...o.sync,
  };
  const settings: Settings = {
    facility_name: name,
    facility_id: joined ? id : null,
    facility_role: joined ? role : null,
    device_id: THIS_DEVICE_ID,
    fingerprint: THIS_DEVICE_FINGERPRINT,
    relay_id: joined ? '12D3KooWRelayNodeNanaoCity0000000000000000000000000' : null,
    relay_addrs: joined ? ['/dns4/relay.nanao.example.jp/udp/4433/quic-v1', '/ip4/10.20.0.5/tcp/4433'] : [],
    lan: true,
    data_dir,
    version: '0.1.0',
    ...o.settings,
  };
  const facilities: FacilityChoice[] = o.facilities ?? [
    { id, name, role, is_self: true },
    { id: '0194a3c2-7d1e-7c3a-9f00-0000000000c2', name: '恵寿総合病院', role: 'clinic', is_self: false },
    { id: '0194a3c2-7d1e-7c3a-9f00-0000000000c3', name: '七尾市居宅介護支援事業所', role: 'care-office', is_self: false },
    { id: '0194a3c2-7d1e-7c3a-9f00-0000000000c4', name: '七尾市立小丸山小学校 避難所', role: 'shelter', is_self: false },
    { id: '0194a3c2-7d1e-7c3a-9f00-0000000000c5', name: '七尾市災害対策本部', role: 'hq', is_self: false },
  ];
  const devices: FacilityDevice[] = o.devices ?? [
    { device_id: THIS_DEVICE_ID, fingerprint: THIS_DEVICE_FINGERPRINT, is_self: true, revoked: false, revoking: false },
    { device_id: OTHER_DEVICE_ID, fingerprint: OTHER_DEVICE_FINGERPRINT, is_self: false, revoked: false, revoking: false },
  ];
  const trust: TrustDirectory = {
    authority_fingerprint: AUTHORITY_FINGERPRINT,
    facilities: facilities.map(
      (f): FacilityTrust => ({
        id: f.id,
        name: f.name,
        role: f.role,
        is_self: f.is_self,
        revoked: false,
        trust: 'verified',
        safety_number: safetyNumberOf(f.id),
        pinned_safety_number: null,
        problem: null,
        devices: f.is_self ? devices.filter((d) => !d.revoked).length : 1,
        refused: [],
      }),
    ),
    ignored: [],
    ...o.trust,
  };
  return {
    phase,
    facility_name: phase === 'new' || phase === 'locked' ? null : name,
    facility_role: joined && phase !== 'locked' ? role : null,
    staff: phase === 'ready' ? staff : null,
    staff_list: staffList,
    passwords: o.passwords ?? { [staff.login]: 'password123' },
    failed_sign_ins: {},
    passphrase: o.passphrase ?? 'correct horse battery',
    invites: o.invites ?? {},
    sync,
    settings,
    facilities,
    devices,
    trust,
    new_safety_numbers: {},
    device_invites: [],
    data_dir,
    locked: false,
    last_active_ms: Date.now(),
    idle_lock: idleLockOf(o.idleLockMs ?? 600_000, o.idleLockFixed ?? false),
    audit: numbered(o.audit ?? []),
    audit_broken: null,
    audit_chains: [],
    card: null,
    card_status: {
      available: true,
      state: 'ready',
      readers: ['SONY FeliCa RC-S300'],
      message: 'カードリーダーの準備ができています',
      message_en: 'The card reader is ready',
      last_error: null,
    },
    card_wait_ms: 20_000,
    failed_pins: {},
    two_factor: o.twoFactor ?? false,
  };
}

/** Entries numbered in their device's chain, in order. */
function numbered(entries: Omit<AuditEntryView, 'seq'>[]): AuditEntryView[] {
  const next: Record<string, number> = {};
  return entries.map((e) => ({ ...e, seq: (next[e.device] = (next[e.device] ?? 0) + 1) }));
}

function status(s: MockState): AppStatus {
  lockIfIdle(s);
  return {
    phase: s.phase,
    facility_name: s.facility_name,
    facility_role: s.facility_role,
    staff: s.staff,
    data_dir: s.data_dir,
    idle_lock: s.idle_lock,
    two_factor: s.phase === 'new' || s.phase === 'locked' ? false : s.two_factor,
  };
}

/** Appends an audit entry as the engine records it (attributed to whoever is signed in, or `staff`). */
export function record(
  s: MockState,
  action: AuditAction,
  fields: string[] = [],
  staff: string | null | undefined = undefined,
  doc: string | null = null,
): AuditEntryView {
  const login = staff === undefined ? (s.staff?.login ?? null) : staff;
  const entry: AuditEntryView = {
    seq: s.audit.filter((e) => e.device === THIS_DEVICE_ID).length + 1,
    at_ms: Date.now(),
    staff: login,
    staff_name: s.staff_list.find((x) => x.login === login)?.name ?? null,
    device: THIS_DEVICE_ID,
    this_device: true,
    facility: s.settings.facility_id ?? DEFAULT_FACILITY_ID,
    facility_name: s.settings.facility_name,
    doc,
    action,
    fields,
  };
  s.audit.push(entry);
  return entry;
}

/** Locks the session (recording `lock`) when nobody is signed in is not the case and it is open. */
function lockNow(s: MockState, why: 'idle' | 'manual') {
  if (!s.staff || s.locked) return;
  s.locked = true;
  s.phase = 'session_locked';
  record(s, 'lock', [why]);
}

/** The engine's own idle check: a session whose last command is older than the limit locks. */
function lockIfIdle(s: MockState) {
  if (s.staff && !s.locked && Date.now() - s.last_active_ms > idleLimitMs(s.idle_lock)) lockNow(s, 'idle');
}

/** Starts `who`'s session: the same person goes on; anyone else replaces the one before. */
function startSession(s: MockState, who: Staff, method: 'password' | 'card') {
  if (s.staff && s.staff.id !== who.id) record(s, 'sign-out');
  s.staff = who;
  record(s, 'sign-in', [method]);
  s.locked = false;
  s.phase = 'ready';
  s.last_active_ms = Date.now();
}

function afterUnlock(s: MockState): Phase {
  s.facility_role = s.settings.facility_role;
  if (s.facility_role === null) return 'not_joined';
  if (s.staff) return 'ready';
  return s.staff_list.length === 0 ? 'no_staff' : 'signed_out';
}

function requireUnlocked(s: MockState) {
  if (s.phase === 'new') fail('not_initialised', 'no facility in the data directory');
  if (s.phase === 'locked') fail('locked', 'the facility is locked');
}

/** What `invite_preview` answers for `code`, or the error it fails with. */
function preview(s: MockState, text: string): InvitePreview {
  const code = text.trim();
  if (code === '') fail('bad_invite', 'the invite code is empty');
  let known: MockInvite | undefined = s.invites[code];
  if (!known && Object.keys(s.invites).length === 0 && code.startsWith('musubi2')) {
    known = {
      kind: 'new_facility',
      facility_name: s.settings.facility_name,
      role: 'clinic',
      authority_fingerprint: AUTHORITY_FINGERPRINT,
      expires_at_ms: Date.now() + 7 * 24 * 3600_000,
    };
  }
  if (!known) {
    fail(
      'bad_invite',
      'this is not a Musubi invite code (it should start with musubi2); copy the whole line that `musubi-node invite` or `musubi device invite` printed',
    );
  }
  if (known.expires_at_ms <= Date.now()) {
    fail('invite_expired', 'this invite has expired; ask whoever gave it for a new one');
  }
  const { kind, facility_name, role, authority_fingerprint, expires_at_ms } = known;
  return { kind, facility_name, role, authority_fingerprint, expires_at_ms };
}

/** What every staff command checks first: signed in, the session open (and not idle too long). */
export function requireStaff(s: MockState) {
  requireUnlocked(s);
  if (!s.staff) fail('not_signed_in', 'no staff member is signed in');
  lockIfIdle(s);
  if (s.locked) fail('session_locked', 'the session is locked; sign in again to go on');
  s.last_active_ms = Date.now();
}

/** As `requireStaff`, for an administrator only. */
export function requireAdmin(s: MockState) {
  requireStaff(s);
  if (s.staff?.role !== 'admin') fail('admin_only', 'only an administrator of this device may do this');
}

function inPeriod(e: AuditEntryView, since: number | null, until: number | null): boolean {
  return (since === null || e.at_ms >= since) && (until === null || e.at_ms < until);
}

/** The day (YYYY-MM-DD, Japan time) of `ms`. */
function jstDay(ms: number): string {
  return new Date(ms + 9 * 3600_000).toISOString().slice(0, 10);
}

function reviewOf(e: AuditEntryView): AuditReviewView {
  const field = (p: string) => e.fields.find((f) => f.startsWith(p))?.slice(p.length) ?? null;
  const [from, to] = (field('period:') ?? '/').split('/');
  const chain = field('chain:');
  return {
    seq: e.seq,
    device: e.device,
    at_ms: e.at_ms,
    staff: e.staff,
    staff_name: e.staff_name,
    from,
    to,
    entries: Number(field('entries:') ?? 0),
    chain_intact: chain === null ? null : chain === 'intact',
  };
}

/** The default handlers: session, sync and settings commands over `app.state`, as the engine behaves. */
export const defaultHandlers: Handlers = {
  app_status: (_a, { state }) => status(state),
  create_facility: async ({ name, passphrase }, { state }) => {
    if (state.phase !== 'new') fail('already_initialised', 'a facility already exists');
    if (!String(name ?? '').trim()) fail('invalid_input', 'the facility name is empty');
    if ([...String(passphrase ?? '')].length < 8) fail('invalid_input', 'the passphrase is shorter than 8 characters');
    await sleep(300); // key creation takes a moment
    state.passphrase = passphrase;
    state.facility_name = String(name).trim();
    state.settings.facility_name = state.facility_name;
    state.phase = 'not_joined';
    return status(state);
  },
  unlock: ({ passphrase }, { state }) => {
    if (state.phase === 'new') fail('not_initialised', 'no facility in the data directory');
    if (state.phase === 'locked') {
      if (passphrase !== state.passphrase) fail('wrong_passphrase', 'the passphrase does not unlock this facility');
      state.facility_name = state.settings.facility_name;
      state.phase = afterUnlock(state);
    }
    return status(state);
  },
  invite_preview: ({ invite }, { state }) => preview(state, String(invite ?? '')),
  join: async ({ invite }, app) => {
    const { state } = app;
    requireUnlocked(state);
    const code = String(invite ?? '').trim();
    const known = preview(state, code);
    const entry = state.invites[code];
    if (entry?.refuse) fail(entry.refuse.kind, entry.refuse.message);
    if (entry?.pending) {
      entry.pending--;
      const answer: JoinAnswer = {
        status: status(state),
        pending: { kind: known.kind, expires_at_ms: known.expires_at_ms },
      };
      return answer;
    }
    const s = state.settings;
    s.facility_id = s.facility_id ?? DEFAULT_FACILITY_ID;
    s.facility_role = known.role ?? s.facility_role ?? 'clinic';
    s.facility_name = known.facility_name;
    s.relay_id = s.relay_id ?? '12D3KooWRelayNodeNanaoCity0000000000000000000000000';
    if (s.relay_addrs.length === 0) s.relay_addrs = ['/ip4/10.20.0.5/tcp/4433'];
    state.facility_role = s.facility_role;
    state.facility_name = s.facility_name;
    state.phase = afterUnlock(state);
    state.sync = { ...state.sync, state: 'online', last_sync_ms: LAST_SYNC_MS };
    const answer: JoinAnswer = { status: status(state), pending: null };
    return answer;
  },
  create_staff: ({ login, name, password, role }, { state }) => {
    requireUnlocked(state);
    if (state.staff_list.length > 0) {
      if (!state.staff) fail('not_signed_in', 'sign in to add staff accounts');
      requireStaff(state);
      if (state.staff?.role !== 'admin') fail('admin_only', 'only an administrator of this device adds staff accounts');
    }
    const l = String(login ?? '').trim();
    if (!l || /\s/.test(l)) fail('invalid_input', 'a login is 1 to 64 bytes without spaces');
    if ([...String(password ?? '')].length < 8) fail('invalid_input', 'a password has at least 8 characters (and at most 1024 bytes)');
    if (state.staff_list.some((s) => s.login === l)) fail('invalid_input', `a staff account "${l}" already exists`);
    const r: StaffRole = state.staff_list.length === 0 ? 'admin' : ((role as StaffRole | null) ?? 'staff');
    const staff: Staff = { id: `staff-${state.staff_list.length + 1}`, login: l, name: String(name).trim(), role: r, card: null };
    state.staff_list.push(staff);
    state.passwords[l] = password;
    record(state, 'staff-add', [`login=${l}`, `role=${r}`], state.staff?.login ?? l);
    if (state.phase === 'no_staff') state.phase = 'signed_out';
    return staff;
  },
  list_staff: (_a, { state }) => {
    requireStaff(state);
    return state.staff_list;
  },
  sign_in: ({ login, password }, { state }) => {
    requireUnlocked(state);
    const l = String(login ?? '').trim();
    const who = state.staff_list.find((s) => s.login === l);
    if (state.two_factor) {
      record(state, 'sign-in-failed', ['password', 'second-factor-needed'], l);
      fail('card_required', 'this device requires two-factor sign-in: sign in with your staff card and its PIN (この端末は二要素認証が必要です。職員カードとPINでサインインしてください)');
    }
    // From the fifth wrong password in a row, sign-in pauses (30 s, then longer): even the right one waits.
    if (who && (state.failed_sign_ins[l] ?? 0) >= 5) {
      record(state, 'sign-in-failed', ['locked'], l);
      throw {
        kind: 'sign_in_locked',
        message: 'too many wrong passwords for this account: try again in 30 s',
        retry_after_s: 30,
      } satisfies MockError;
    }
    if (!who || state.passwords[l] !== password) {
      if (who) state.failed_sign_ins[l] = (state.failed_sign_ins[l] ?? 0) + 1;
      record(state, 'sign-in-failed', ['password'], l);
      fail('bad_credentials', 'wrong login or password');
    }
    state.failed_sign_ins[l] = 0;
    state.failed_pins[l] = 0;
    startSession(state, who, 'password');
    return who;
  },
  sign_in_card: async ({ pin }, { state }) => {
    requireUnlocked(state);
    const p = String(pin ?? '').trim();
    if (!/^[0-9]{4,8}$/.test(p)) fail('invalid_input', 'a PIN is 4 to 8 digits');
    const until = Date.now() + state.card_wait_ms;
    while (!state.card && Date.now() < until) await sleep(100);
    const card = state.card;
    if (!card) fail('no_card', `no card was presented within ${state.card_wait_ms / 1000}s`);
    const who = state.staff_list.find((s) => s.login === card.login && s.card === card.kind) ?? null;
    if (card.kind === 'my_number') {
      // The card checks its own PIN (4 digits), before the card's id is known.
      if (p.length !== 4) fail('invalid_input', 'the user authentication PIN is needed (3 tries left); nothing was sent to the card');
      const tries = card.tries ?? 3;
      if (tries === 0) fail('pin_locked', 'the user authentication PIN is locked; the resident must have it reset at the municipal office');
      if (tries === 1) fail('pin_locked', 'only one try is left for the user authentication PIN: another wrong PIN locks it; confirm with the resident (--confirm-last-try) or ask the municipal office to reset it');
      if (p !== card.pin) {
        card.tries = tries - 1;
        throw {
          kind: 'wrong_pin',
          message: `wrong user authentication PIN: ${card.tries} tries left before the card locks it; ask the resident before trying again`,
          tries_left: card.tries,
        } satisfies MockError;
      }
      card.tries = 3;
      record(state, 'card-read', ['staff'], state.staff?.login ?? null);
      if (!who) {
        record(state, 'sign-in-failed', ['card'], null);
        fail('unknown_card', 'this card is not bound to any staff account of this device');
      }
    } else {
      record(state, 'card-read', ['staff'], state.staff?.login ?? null);
      // Whether the card is known is checked before its PIN (and not recorded).
      if (!who) fail('unknown_card', 'this card is not bound to any staff account of this device');
      const failed = state.failed_pins[who.login] ?? 0;
      if (failed >= 5) {
        record(state, 'sign-in-failed', ['card'], who.login);
        fail('pin_locked', 'too many wrong staff PINs: this card is locked for sign-in; sign in with the password to unlock it');
      }
      if (p !== card.pin) {
        state.failed_pins[who.login] = failed + 1;
        record(state, 'sign-in-failed', ['card'], who.login);
        const left = 5 - (failed + 1);
        if (left === 0) fail('pin_locked', 'too many wrong staff PINs: this card is locked for sign-in; sign in with the password to unlock it');
        throw {
          kind: 'wrong_pin',
          message: `wrong staff PIN: ${left} tries left before the card is locked for sign-in`,
          tries_left: left,
        } satisfies MockError;
      }
      state.failed_pins[who.login] = 0;
    }
    startSession(state, who!, 'card');
    return who;
  },
  sign_out: (_a, { state }) => {
    requireUnlocked(state);
    if (state.staff) record(state, 'sign-out');
    state.staff = null;
    state.locked = false;
    if (state.phase === 'ready' || state.phase === 'session_locked') state.phase = 'signed_out';
    return null;
  },
  lock_session: ({ reason }, { state }) => {
    requireUnlocked(state);
    lockNow(state, reason === 'manual' ? 'manual' : 'idle');
    return status(state);
  },
  session_touch: (_a, { state }) => {
    requireStaff(state);
    return null;
  },
  set_idle_lock: ({ minutes }, { state }) => {
    const m = Number(minutes);
    if (!(Number.isInteger(m) && m >= 1 && m <= 60)) fail('invalid_input', 'the idle time is 1 to 60 minutes');
    if (state.idle_lock.fixed) fail('invalid_input', 'the idle time is fixed by MUSUBI_IDLE_LOCK_SECS for this computer');
    requireAdmin(state);
    state.idle_lock = idleLockOf(m * 60_000);
    record(state, 'staff-change', [`idle-lock:${m}min`]);
    return state.idle_lock;
  },
  card_status: (_a, { state }) => state.card_status,
  audit_list: ({ query }, { state }) => {
    const q = (query ?? {}) as AuditQuery;
    if (q.doc && !/^[0-9a-f-]{36}$/i.test(q.doc.trim())) fail('invalid_input', `"${q.doc}" is not a document id`);
    requireAdmin(state);
    record(state, 'audit-read', ['list']);
    const matched = state.audit.filter(
      (e) =>
        (!q.staff || e.staff === q.staff.trim()) &&
        (!q.doc || e.doc === q.doc.trim()) &&
        (!q.action || e.action === q.action) &&
        inPeriod(e, q.since_ms ?? null, q.until_ms ?? null),
    );
    const page: AuditPage = {
      entries: matched.slice().reverse().slice(0, 500),
      matched: matched.length,
      reviews: state.audit
        .filter((e) => e.action === 'review')
        .reverse()
        .slice(0, 24)
        .map(reviewOf),
    };
    return page;
  },
  audit_verify: (_a, { state }) => {
    requireAdmin(state);
    const b = state.audit_broken;
    const mine = state.audit.filter((e) => e.device === THIS_DEVICE_ID).length;
    const chains: AuditChainView[] = [
      {
        device: THIS_DEVICE_ID,
        this_device: true,
        facility: state.settings.facility_id ?? DEFAULT_FACILITY_ID,
        facility_name: state.settings.facility_name,
        entries: b ? 0 : mine,
        first: b || !mine ? null : 1,
        last: b || !mine ? null : mine,
        broken: b,
      },
      ...state.audit_chains,
    ];
    const verdict: AuditVerdict = {
      intact: chains.every((c) => !c.broken),
      entries: chains.reduce((n, c) => n + c.entries, 0),
      chains,
    };
    record(state, 'audit-read', ['verify']);
    return verdict;
  },
  audit_review: ({ sinceMs, untilMs }, { state }) => {
    const since = Number(sinceMs);
    const until = Number(untilMs);
    if (!(since >= 0) || !(until >= 0)) fail('invalid_input', 'since_ms is not a time');
    if (until <= since) fail('invalid_input', 'the period ends before it starts');
    requireAdmin(state);
    const entries = state.audit.filter((e) => inPeriod(e, since, until)).length;
    const breaks = [
      ...(state.audit_broken ? [`break:${THIS_DEVICE_ID}#${state.audit_broken.seq}`] : []),
      ...state.audit_chains.filter((c) => c.broken).map((c) => `break:${c.device}#${c.broken?.seq}`),
    ].slice(0, 8);
    const chain = breaks.length ? 'chain:broken' : 'chain:intact';
    const e = record(state, 'review', [`period:${jstDay(since)}/${jstDay(until - 1)}`, `entries:${entries}`, chain, ...breaks]);
    return reviewOf(e);
  },
  sync_status: (_a, { state }) => state.sync,
  sync_now: () => null,
  settings: (_a, { state }) => {
    requireStaff(state);
    return state.settings;
  },
  facilities: (_a, { state }) => {
    requireStaff(state);
    if (!state.facility_role) fail('not_enrolled', 'this device has not joined a deployment');
    return state.facilities;
  },
  facility_devices: (_a, { state }) => {
    requireStaff(state);
    if (!state.facility_role) fail('not_enrolled', 'this device has not joined a deployment');
    return state.devices;
  },
  device_invite: ({ hours }, { state }) => {
    requireAdmin(state);
    const h = Number(hours);
    if (!(h >= 1 && h <= 720)) fail('invalid_input', 'an invite lasts 1 to 720 hours');
    const invite: DeviceInvite = {
      code: `musubi2DeviceInvite${state.device_invites.length + 1}qWx3ZmFjaWxpdHktbGFwdG9wLW5hbmFvLWNsaW5pYw`,
      expires_at_ms: Date.now() + h * 3600_000,
      facility_name: state.settings.facility_name,
    };
    state.device_invites.push(invite);
    return invite;
  },
  revoke_device: ({ device }, { state }) => {
    requireAdmin(state);
    const d = state.devices.find((x) => x.device_id === device);
    if (d?.is_self) fail('invalid_input', 'this device cannot revoke itself; revoke it from another device of the facility');
    if (!d || d.revoked) fail('not_found', `${device} is not a current device of this facility`);
    d.revoking = true;
    return null;
  },
  trust_directory: (_a, { state }) => {
    requireStaff(state);
    if (!state.facility_role) fail('not_enrolled', 'this device has not joined a deployment');
    return state.trust;
  },
  confirm_root: ({ facility, safetyNumber }, { state }) => {
    requireAdmin(state);
    const digits = safetyDigits(String(safetyNumber ?? ''));
    if (digits.length !== 30) fail('invalid_input', `a safety number has 30 digits; ${digits.length} were typed`);
    const f = state.trust.facilities.find((x) => x.id === facility);
    if (!f) fail('not_found', `no facility "${facility}" in the directory`);
    const expected = state.new_safety_numbers[f.id] ?? f.safety_number ?? '';
    const given = digits.replace(/(\d{5})(?=\d)/g, '$1 ');
    if (safetyDigits(expected) !== digits) {
      fail(
        'safety_number_mismatch',
        `the safety number ${given} does not match facility ${f.name}'s root key (see \`musubi facilities\`); read it again with the facility by phone`,
      );
    }
    f.trust = 'verified';
    f.safety_number = expected;
    f.pinned_safety_number = null;
    return null;
  },
};

/** The fake Tauri internals, installed in the page before its scripts run. */
function installFakeTauri() {
  type Listener = { event: string; id: number; handler: number };
  const w = window as any;
  const callbacks = new Map<number, (data: unknown) => void>();
  const listeners: Listener[] = [];
  let nextEventId = 1;

  function registerCallback(cb: (data: unknown) => void, once = false): number {
    const id = crypto.getRandomValues(new Uint32Array(1))[0];
    callbacks.set(id, (data) => {
      if (once) callbacks.delete(id);
      cb(data);
    });
    return id;
  }

  function deliver(event: string, payload: unknown): number {
    let n = 0;
    for (const l of listeners.filter((x) => x.event === event)) {
      const cb = callbacks.get(l.handler);
      if (cb) {
        cb({ event, id: l.id, payload });
        n++;
      }
    }
    return n;
  }

  async function invoke(cmd: string, args: Record<string, unknown> = {}, _options?: unknown) {
    const a = JSON.parse(JSON.stringify(args ?? {})) as Record<string, any>;
    switch (cmd) {
      case 'plugin:event|listen': {
        const id = nextEventId++;
        listeners.push({ event: a.event, id, handler: a.handler });
        return id;
      }
      case 'plugin:event|unlisten': {
        const i = listeners.findIndex((l) => l.event === a.event && l.id === a.eventId);
        if (i >= 0) listeners.splice(i, 1);
        return null;
      }
      case 'plugin:event|emit':
      case 'plugin:event|emit_to':
        deliver(a.event, a.payload);
        return null;
    }
    const r = await w.__musubiMockInvoke(cmd, a);
    if (r && 'error' in r) throw r.error;
    return r ? r.data : null;
  }

  w.__TAURI_INTERNALS__ = {
    invoke,
    transformCallback: registerCallback,
    unregisterCallback: (id: number) => callbacks.delete(id),
    runCallback: (id: number, data: unknown) => callbacks.get(id)?.(data),
    callbacks,
    convertFileSrc: (path: string, protocol = 'asset') => `${protocol}://localhost/${encodeURIComponent(path)}`,
    metadata: {
      currentWindow: { label: 'main' },
      currentWebview: { windowLabel: 'main', label: 'main' },
    },
    plugins: { path: { sep: '/', delimiter: ':' } },
  };
  w.__TAURI_EVENT_PLUGIN_INTERNALS__ = {
    unregisterListener: (event: string, id: number) => {
      const i = listeners.findIndex((l) => l.event === event && l.id === id);
      if (i >= 0) listeners.splice(i, 1);
    },
  };
  w.__musubiMock = {
    deliver,
    listening: (event: string) => listeners.some((l) => l.event === event),
  };
}

/**
 * Sends a typed event to the page, as the Rust side's `Event::emit` does. Waits (up to 5 s) until
 * the page listens to `event`, then delivers it to every listener.
 */
export async function emit(page: Page, event: string, payload: unknown): Promise<void> {
  await page.waitForFunction((e) => (window as any).__musubiMock?.listening(e), event, { timeout: 5_000 });
  await page.evaluate(([e, p]) => (window as any).__musubiMock.deliver(e, p), [event, payload] as const);
}

/**
 * Opens the app with the engine mocked: default handlers for session, sync and settings commands
 * (over a state built from `opts`), plus `handlers` (which win). Loads `opts.path` (hash route) and
 * waits for the first screen.
 */
export async function openApp(page: Page, handlers: Handlers = {}, opts: OpenOptions = {}): Promise<MockApp> {
  const table = new Map<string, Handler>();
  const add = (hs: Handlers) => {
    for (const [k, h] of Object.entries(hs)) table.set(snake(k), h);
  };
  add(defaultHandlers);
  add(handlers);

  const app: MockApp = {
    page,
    state: initialState(opts),
    calls: [],
    unhandled: [],
    callsTo: (cmd) => app.calls.filter((c) => c.cmd === snake(cmd)).map((c) => c.args),
    emit: (event, payload) => emit(page, event, payload),
    setSync: async (s) => {
      app.state.sync = { ...app.state.sync, ...s };
      await emit(page, EVENTS.syncStatus, app.state.sync);
    },
    handle: add,
  };

  await page.exposeFunction('__musubiMockInvoke', async (cmd: string, args: Record<string, any>) => {
    app.calls.push({ cmd, args });
    const h = table.get(cmd);
    if (!h) {
      app.unhandled.push(cmd);
      console.warn(`[mock] no handler for command "${cmd}"`);
      return { error: { kind: 'internal', message: `no mock handler for ${cmd}` } };
    }
    try {
      const data = await h(args, app);
      return { data: data === undefined ? null : data };
    } catch (e) {
      if (isMockError(e)) {
        return {
          error: { kind: e.kind, message: e.message, retry_after_s: e.retry_after_s ?? null, tries_left: e.tries_left ?? null },
        };
      }
      console.error(`[mock] handler for "${cmd}" threw`, e);
      return { error: { kind: 'internal', message: `mock handler for ${cmd} threw: ${String(e)}` } };
    }
  });
  await page.addInitScript(installFakeTauri);
  if (opts.lang) {
    await page.addInitScript((lang) => {
      if (!localStorage.getItem('musubi.lang')) localStorage.setItem('musubi.lang', lang);
    }, opts.lang);
  }

  await page.goto('/' + (opts.path ?? ''));
  if (opts.waitReady ?? true) {
    // The shell has drawn the screen of the phase (a form before sign-in, the shell when ready).
    await page.locator('.gate, .shell').first().waitFor();
  }
  return app;
}
