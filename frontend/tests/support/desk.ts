// The reception desk's engine, faked for UI tests and benchmarks: it keeps a roster as the engine's
// Desk does, so counts, search, card taps and stays behave like the real commands.

import { expect, type Page } from '@playwright/test';
import { openApp, fail, type MockApp } from './mock';
import type {
  CardStatus,
  CareFlag,
  DeskCounts,
  DeskEvacuee,
  DeskView,
  NewEvacuee,
  Presence,
  ShelterInfo,
  ShelterListing,
  StayKind,
} from '../../src/lib/bindings';

export const SHELTER_ID = '0194a3c2-7d1e-7c3a-9f00-00000000a001';

export interface Person {
  id: string;
  name: string;
  kana: string;
  birth_date: string;
  sex: string;
  card_id: string;
  flags: CareFlag[];
  consent: boolean;
  presence: Presence;
  checked_in_at: string;
  last_event_at: string;
}

/** Folds a name as the engine's search does: width, spaces, case, katakana → hiragana. */
export function fold(s: string): string {
  return s
    .normalize('NFKC')
    .replace(/[\s\u3000]/g, '')
    .toLowerCase()
    .replace(/[\u30a1-\u30f6]/g, (c) => String.fromCharCode(c.charCodeAt(0) - 0x60));
}

export const iso = (ms: number) => new Date(ms).toISOString();

/** A shelter's roster and the reception commands over it. */
export class FakeDesk {
  info: ShelterInfo;
  people: Person[] = [];
  open = false;
  private n = 0;

  constructor(info: Partial<ShelterInfo> = {}, public role = 'owner') {
    this.info = {
      code: 'CC0000000504',
      name: '御祓地区コミュニティセンター',
      address: '石川県七尾市古府町',
      capacity: 50,
      status: 'open',
      status_at: '2024-01-01T16:30:00.000Z',
      medical_doc: '',
      ...info,
    };
  }

  add(p: Partial<Person> & { name: string }): Person {
    const person: Person = {
      id: `e${String(++this.n).padStart(31, '0')}`,
      kana: '',
      birth_date: '',
      sex: '',
      card_id: '',
      flags: [],
      consent: true,
      presence: 'present',
      checked_in_at: '',
      last_event_at: '',
      ...p,
    };
    if (person.presence !== 'out' && !person.checked_in_at) {
      person.checked_in_at = iso(Date.now() - 3_600_000);
      person.last_event_at = person.checked_in_at;
    }
    this.people.push(person);
    return person;
  }

  row(p: Person): DeskEvacuee {
    return {
      id: p.id,
      name: p.name,
      kana: p.kana,
      birth_date: p.birth_date,
      sex: p.sex,
      household: '',
      flags: p.flags,
      allergies: '',
      consent: p.consent,
      has_card: p.card_id !== '',
      presence: p.presence,
      checked_in_at: p.checked_in_at,
      last_event_at: p.last_event_at,
    };
  }

  counts(): DeskCounts {
    const present = this.people.filter((p) => p.presence !== 'out');
    return {
      present: present.length,
      on_leave: present.filter((p) => p.presence === 'on-leave').length,
      out: this.people.length - present.length,
      care: present.filter((p) => p.flags.length > 0).length,
      evacuees: this.people.length,
      records: this.people.length,
      capacity: this.info.capacity,
    };
  }

  view(): DeskView {
    const rank = { present: 0, 'on-leave': 1, out: 2 } as const;
    return {
      id: SHELTER_ID,
      shelter: this.info,
      counts: this.counts(),
      evacuees: [...this.people]
        .sort((a, b) => rank[a.presence] - rank[b.presence] || fold(a.kana || a.name).localeCompare(fold(b.kana || b.name)))
        .map((p) => this.row(p)),
      needs: [],
      requests: [],
    };
  }

  listing(): ShelterListing {
    return { ...this.info, id: SHELTER_ID, present: this.counts().present, role: this.role };
  }

  /** Another desk checks someone in (what a synced bundle does to this desk's roster). */
  arriveFromElsewhere(name: string, kana: string) {
    this.add({ name, kana, birth_date: '1980-04-01', presence: 'present', checked_in_at: iso(Date.now()) });
  }

  checkin(person: NewEvacuee, cardId: string | null) {
    const card = (cardId ?? person.card_id ?? '').trim().toLowerCase();
    if (!person.name.trim() && !card) fail('invalid_input', 'the name (氏名) is empty');
    let p = card ? this.people.find((x) => x.card_id === card) : undefined;
    if (!p && person.name.trim() && person.birth_date)
      p = this.people.find((x) => fold(x.name) === fold(person.name) && x.birth_date === person.birth_date);
    if (!p) {
      if (!person.name.trim() && card) fail('not_found', 'no evacuee of this shelter holds this card yet; enter the name to register it');
      if (!person.name.trim()) fail('invalid_input', 'the name (氏名) is empty');
      if (!card && !person.birth_date) fail('invalid_input', 'the birth date (生年月日) is needed to check in without a card');
      p = this.add({ ...person, card_id: card, presence: 'out' });
    } else if (card && !p.card_id) {
      p.card_id = card;
    }
    const already = p.presence !== 'out';
    if (!already) {
      p.presence = 'present';
      p.checked_in_at = iso(Date.now());
      p.last_event_at = p.checked_in_at;
    }
    return {
      evacuee: p.id,
      reused: true,
      already_present: already,
      event: already ? '' : 'ev1',
      moved_from: [],
      notifications: person.relatives?.length ?? 0,
    };
  }

  stay(id: string, kind: StayKind): DeskEvacuee {
    const p = this.people.find((x) => x.id === id) ?? fail('not_found', `no evacuee ${id}`);
    const allowed =
      (kind === 'leave' && p.presence === 'present') ||
      (kind === 'return' && p.presence === 'on-leave') ||
      (kind === 'check-out' && p.presence !== 'out') ||
      (kind === 'check-in' && p.presence === 'out');
    if (!allowed) fail('invalid_input', `cannot record ${kind} for an evacuee who is ${p.presence}`);
    p.presence = kind === 'leave' ? 'on-leave' : kind === 'check-out' ? 'out' : 'present';
    p.last_event_at = iso(Date.now());
    if (kind === 'check-in') p.checked_in_at = p.last_event_at;
    return this.row(p);
  }

  search(query: string, limit: number | null): DeskEvacuee[] {
    const q = fold(query);
    if (!q) return [];
    return this.people
      .filter((p) => fold(p.name).includes(q) || fold(p.kana).includes(q))
      .slice(0, limit ?? 20)
      .map((p) => this.row(p));
  }

  reader: CardStatus = {
    available: true,
    state: 'ready',
    readers: ['SONY FeliCa Port/PaSoRi 4.0'],
    message: 'カードをかざしてください',
    message_en: 'Hold a card to the reader',
    last_error: null,
  };

  handlers() {
    return {
      card_status: () => this.reader,
      shelter_list: () => [this.listing()],
      shelter_open: ({ request }: Record<string, any>) => {
        this.info = { ...this.info, name: request.name, capacity: request.capacity, address: request.address, code: request.code };
        this.role = 'owner';
        return { shelter: SHELTER_ID, medical: '0194a3c2-7d1e-7c3a-9f00-00000000a002' };
      },
      desk_open: ({ shelter }: Record<string, any>) => {
        if (shelter !== SHELTER_ID) fail('not_found', `no shelter ${shelter}`);
        this.open = true;
        return this.view();
      },
      desk_roster: () => (this.open ? this.view() : fail('not_found', 'no reception desk is open')),
      desk_close: () => {
        this.open = false;
        return null;
      },
      desk_search: ({ query, limit }: Record<string, any>) => this.search(query, limit),
      desk_checkin: ({ person, cardId }: Record<string, any>) => this.checkin(person, cardId),
      desk_stay: ({ evacuee, kind }: Record<string, any>) => this.stay(evacuee, kind),
      shelter_set_status: ({ status }: Record<string, any>) => {
        this.info.status = status;
        return null;
      },
    };
  }
}

/** Opens the reception screen of a shelter facility whose desk is already open. */
export async function openDesk(page: Page, desk: FakeDesk, opts: { lang?: 'ja' | 'en' } = {}): Promise<MockApp> {
  desk.open = true;
  const app = await openApp(page, desk.handlers(), {
    path: '#/reception',
    facility: { name: '御祓地区コミュニティセンター', role: 'shelter' },
    lang: opts.lang,
  });
  await expect(page.locator('#reception-search')).toBeFocused();
  return app;
}

