// 災害対策本部: HQ staff watching every shelter, with the engine mocked at the IPC boundary.
// The figures are 七尾市's real shelter counts after the 2024 Noto earthquake
// (../shared/data/shelters/nanao-noto-2024, CC BY 4.0): 29 shelters on 9 January 2024 at 18:00,
// and 117 snapshots from then to 31 August 2024.

import { test, expect } from '@playwright/test';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { openApp, deferred, fail } from './support/mock';
import type { History, InquiryAnswer, OpenRequest, ShelterCount, Summary } from '../src/lib/bindings';

const DATA = fileURLToPath(new URL('../../../shared/data/shelters/nanao-noto-2024/', import.meta.url));

/** Parses RFC 4180 CSV (quoted fields with commas). */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') {
      row.push(field);
      field = '';
    } else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') i++;
      row.push(field);
      if (row.some((f) => f !== '')) rows.push(row);
      row = [];
      field = '';
    } else field += c;
  }
  if (field !== '' || row.length > 0) {
    row.push(field);
    rows.push(row);
  }
  return rows;
}

interface Snap {
  id: string;
  name: string;
  count: number;
  capacity: number;
}

/** One snapshot file: each open shelter with its head count and indoor capacity (屋内N人). */
function snapshot(file: string): Snap[] {
  const [head, ...rows] = parseCsv(readFileSync(DATA + 'history/' + file, 'utf-8').replace(/^\uFEFF/, ''));
  const id = head.indexOf('ID');
  const name = head.indexOf('名称');
  const count = head.findIndex((h) => h.startsWith('人数'));
  const cap = head.indexOf('想定収容人数');
  return rows.map((r) => {
    const m = /屋内([\d,]+)人/.exec(r[cap] ?? '');
    return {
      id: r[id],
      name: r[name],
      count: Number((r[count] ?? '').replace(/,/g, '')) || 0,
      capacity: m ? Number(m[1].replace(/,/g, '')) : 0,
    };
  });
}

/** `open_shelter_Nanao-shi_2024-01-09-1800.csv` → RFC 3339 in Japan time. */
function fileTime(file: string): string {
  const m = /(\d{4})-(\d{2})-(\d{2})-(\d{2})(\d{2})\.csv$/.exec(file)!;
  return `${m[1]}-${m[2]}-${m[3]}T${m[4]}:${m[5]}:00+09:00`;
}

const haveData = existsSync(DATA + 'history');
const files = haveData ? readdirSync(DATA + 'history').filter((f) => f.endsWith('.csv')).sort() : [];
const docId = (id: string) => `doc-${id}`;

/** HQ's summary of 9 January 2024 18:00, with a few care counts, requests and one closed shelter. */
function summaryOf(snaps: Snap[], requests: OpenRequest[] = []): Summary {
  const shelters: ShelterCount[] = snaps.map((s, i) => ({
    id: docId(s.id),
    name: s.name,
    code: s.id.startsWith('CC') ? s.id : '',
    address: '',
    status: 'open',
    capacity: s.capacity,
    present: s.count,
    on_leave: Math.floor(s.count / 20),
    care: i % 3 === 0 ? { elderly: Math.ceil(s.count / 3), 'medical-care': 2 } : i % 3 === 1 ? { infant: 3 } : {},
    open_requests: requests.filter((r) => r.shelter === docId(s.id)).length,
    open_needs: 0,
    evacuees: s.count + 5,
  }));
  return {
    as_of: '2024-01-09T18:00:00+09:00',
    shelters,
    total_present: shelters.reduce((a, s) => a + s.present, 0),
    total_on_leave: shelters.reduce((a, s) => a + s.on_leave, 0),
    total_capacity: shelters.reduce((a, s) => a + s.capacity, 0),
    open_shelters: shelters.filter((s) => s.status === 'open').length,
    open_requests: requests,
    unreadable: [],
  };
}

/** Counts over time from every snapshot (a shelter missing from a snapshot had closed: 0). */
function historyOf(): History {
  if (!haveData) {
    // Without the real data, a small series of the same shape.
    const times = ['2024-01-09T18:00:00+09:00', '2024-01-10T18:00:00+09:00', '2024-01-11T18:00:00+09:00'];
    return { times, shelters: [{ id: 'doc-a', name: '御祓地区コミュニティセンター', code: '', counts: [130, 120, 90] }], totals: [130, 120, 90] };
  }
  const snaps = files.map(snapshot);
  const ids = new Map<string, string>();
  for (const s of snaps.flat()) if (!ids.has(s.id)) ids.set(s.id, s.name);
  const shelters = [...ids].map(([id, name]) => ({
    id: docId(id),
    name,
    code: id,
    counts: snaps.map((snap) => snap.find((x) => x.id === id)?.count ?? 0),
  }));
  return {
    times: files.map(fileTime),
    shelters,
    totals: snaps.map((snap) => snap.reduce((a, s) => a + s.count, 0)),
  };
}

const FIRST: Snap[] = haveData
  ? snapshot(files[0])
  : [
      { id: 'CC0000000504', name: '御祓地区コミュニティセンター', count: 130, capacity: 191 },
      { id: 'CC0000000561', name: '石崎小学校', count: 120, capacity: 100 },
      { id: 'CC0000000598', name: '中島小学校（体育館）', count: 227, capacity: 360 },
    ];

const HQ = { facility: { name: '七尾市災害対策本部', role: 'hq' as const }, path: '#/hq' };

const BLANKETS: OpenRequest = {
  id: 'r1',
  item: '毛布',
  quantity: 200,
  unit: '枚',
  urgency: 'high',
  status: 'open',
  requested_at: '2024-01-09T07:30:00+09:00',
  note: '夜間の冷え込み',
  shelter: docId('CC0000000561'),
  shelter_name: '石崎小学校',
};

test('HQ sees every shelter’s counts and an over-capacity shelter flagged', async ({ page }) => {
  const summary = summaryOf(FIRST);
  await openApp(page, { hq_summary: () => summary, hq_history: () => historyOf() }, HQ);

  const rows = page.getByTestId('hq-row');
  await expect(rows).toHaveCount(FIRST.length);
  await expect(page.getByTestId('hq-total-present')).toContainText(String(summary.total_present));

  // 石崎小学校: 120 people in a school for 100. Sorted by occupancy, it comes first and is flagged.
  const ishizaki = rows.filter({ hasText: '石崎小学校' });
  await expect(rows.first()).toContainText('石崎小学校');
  await expect(ishizaki.getByTestId('hq-present')).toContainText('120');
  await expect(ishizaki.getByTestId('hq-capacity')).toHaveText('100');
  await expect(ishizaki.getByTestId('hq-occupancy')).toContainText('120%');
  await expect(ishizaki.getByTestId('hq-over')).toHaveText('定員超過 +20');
  await expect(ishizaki).toHaveAttribute('data-level', 'over');
  await expect(page.getByTestId('hq-over')).toHaveCount(1);
  await expect(page.getByTestId('hq-total-over')).toHaveText('1');

  // A shelter well under capacity is not flagged, and shows its care counts in words.
  const misogi = rows.filter({ hasText: '御祓地区コミュニティセンター' });
  await expect(misogi.getByTestId('hq-present')).toContainText('130');
  await expect(misogi.getByTestId('hq-over')).toHaveCount(0);
  await expect(misogi).toHaveAttribute('data-level', 'ok');
  await expect(misogi.getByTestId('hq-care').getByTestId('care-flag')).toHaveText([/乳幼児\s*3/]);
  await expect(ishizaki.getByTestId('hq-care')).toHaveText('なし');

  // Sorting by 在所 puts 中島小学校（体育館）(227) first, and again reverses it.
  await page.getByTestId('sort-present').click();
  await expect(rows.first()).toContainText('中島小学校（体育館）');
  await expect(page.locator('th[aria-sort=descending]')).toContainText('在所');
  await page.getByTestId('sort-present').click();
  await expect(page.locator('th[aria-sort=ascending]')).toContainText('在所');
  await expect(rows.last()).toContainText('中島小学校（体育館）');
  await page.getByTestId('sort-name').click();
  await expect(page.locator('th[aria-sort=ascending]')).toContainText('避難所');
});

test('a safety inquiry records who asks, then finds a person', async ({ page }) => {
  const answers: InquiryAnswer[] = [
    {
      name: '能登 花子',
      kana: 'のと はなこ',
      shelter: docId('CC0000000504'),
      shelter_name: '御祓地区コミュニティセンター',
      presence: 'present',
      since: '2024-01-02T09:15:00+09:00',
    },
  ];
  const app = await openApp(
    page,
    {
      hq_summary: () => summaryOf(FIRST),
      hq_history: () => historyOf(),
      hq_inquiry: ({ name }) => (name.replace(/\s/g, '') === 'のとはなこ' ? answers : []),
    },
    HQ,
  );
  await expect(page.getByTestId('hq-row').first()).toBeVisible();

  // Nothing is looked up before the person asking is written down.
  await page.locator('#inquiry-name').fill('のと はなこ');
  await page.locator('#inquiry-name').press('Enter');
  await expect(page.getByTestId('inquirer-missing')).toContainText('問い合わせ者の氏名と続柄を入力してください');
  expect(app.callsTo('hq_inquiry')).toHaveLength(0);

  await page.locator('#inquirer-name').fill('能登 一郎');
  await page.locator('#inquirer-relationship').fill('長男');
  await page.locator('#inquirer-contact').fill('090-0000-0000');
  await page.locator('#inquiry-name').press('Enter');
  await expect(page.getByTestId('inquirer-missing')).toHaveCount(0);
  const answer = page.getByTestId('inquiry-answer');
  await expect(answer).toHaveCount(1);
  await expect(answer).toContainText('能登 花子');
  await expect(answer).toContainText('御祓地区コミュニティセンター');
  await expect(answer).toContainText('在所');
  expect(app.callsTo('hq_inquiry')[0]).toEqual({
    name: 'のと はなこ',
    inquirer: { name: '能登 一郎', relationship: '長男', contact: '090-0000-0000' },
  });

  // Somebody who is not found (or did not consent) gets the same plain answer.
  await page.locator('#inquiry-name').fill('七尾 太郎');
  await page.getByTestId('inquiry-submit').click();
  await expect(page.getByTestId('inquiry-none')).toContainText('七尾 太郎');
  await expect(page.getByTestId('inquiry-answer')).toHaveCount(0);
});

test('a chart of counts is drawn', async ({ page }) => {
  const history = historyOf();
  await openApp(page, { hq_summary: () => summaryOf(FIRST), hq_history: () => history }, HQ);

  const chart = page.getByTestId('hq-chart');
  await expect(chart).toBeVisible();
  const total = chart.getByTestId('chart-total');
  await expect(total).toHaveAttribute('data-points', String(history.times.length));
  const points = (await total.getAttribute('points'))!.trim().split(/\s+/);
  expect(points).toHaveLength(history.times.length);
  // The total line starts high (9 January) and ends low (31 August): y grows downwards.
  const y = (p: string) => Number(p.split(',')[1]);
  if (haveData) expect(y(points[0])).toBeLessThan(y(points[points.length - 1]));
  // The largest shelters get lines of their own (at most six), named in the legend.
  const lines = chart.getByTestId('chart-line');
  await expect(lines).toHaveCount(Math.min(6, history.shelters.length));
  const first = await lines.first().getAttribute('data-name');
  await expect(chart.locator('figcaption')).toContainText(first!);
  // Dates along the time axis.
  await expect(chart.getByTestId('chart-x-label').first()).toHaveText(/1月\s*9日/);
  await expect(chart.locator('svg title')).toHaveText('避難者数の推移（合計と主な避難所）');
});

test('the first summary takes a while: progress shows until it arrives', async ({ page }) => {
  const gate = deferred();
  await openApp(
    page,
    {
      hq_summary: async () => {
        await gate.promise;
        return summaryOf(FIRST);
      },
      hq_history: () => historyOf(),
    },
    HQ,
  );
  await expect(page.getByTestId('hq-loading')).toBeVisible();
  await expect(page.getByTestId('hq-row')).toHaveCount(0);
  gate.resolve();
  await expect(page.getByTestId('hq-row')).toHaveCount(FIRST.length);
  await expect(page.getByTestId('hq-loading')).toHaveCount(0);
});

test('new check-ins at a shelter arrive live and HQ’s figures follow', async ({ page }) => {
  let snaps = FIRST.map((s) => ({ ...s }));
  const app = await openApp(page, { hq_summary: () => summaryOf(snaps), hq_history: () => historyOf() }, HQ);
  const misogi = page.getByTestId('hq-row').filter({ hasText: '御祓地区コミュニティセンター' });
  await expect(misogi.getByTestId('hq-present')).toContainText('130');

  // Sixty-five more people reach 御祓 (195 of 191): the shelter is now over capacity too.
  snaps = snaps.map((s) => (s.id === 'CC0000000504' ? { ...s, count: 195 } : s));
  await app.emit('document-changed', { id: docId('CC0000000504'), kind: 'shelter' });
  await expect(misogi.getByTestId('hq-present')).toContainText('195');
  await expect(misogi.getByTestId('hq-over')).toHaveText('定員超過 +4');
  await expect(page.getByTestId('hq-total-over')).toHaveText('2');
  const summaries = app.callsTo('hq_summary').length;

  // Other documents do not make HQ read every shelter again.
  await app.emit('document-changed', { id: 'letter', kind: 'referral' });
  await page.waitForTimeout(1_200);
  expect(app.callsTo('hq_summary').length).toBe(summaries);
});

test('a quiet shelter is flagged: no check-in or check-out reached HQ for 12 hours', async ({ page }) => {
  const now = Date.now();
  const at = (hoursAgo: number) => new Date(now - hoursAgo * 3600_000).toISOString();
  const snaps: Snap[] = [
    { id: 'A', name: '和倉小学校', count: 130, capacity: 396 },
    { id: 'B', name: '能登島小学校', count: 18, capacity: 384 },
  ];
  const history: History = {
    times: [at(20), at(15), at(1)],
    shelters: [
      { id: docId('A'), name: '和倉小学校', code: '', counts: [100, 120, 130] },
      { id: docId('B'), name: '能登島小学校', code: '', counts: [10, 18, 18] },
    ],
    totals: [110, 138, 148],
  };
  await openApp(page, { hq_summary: () => summaryOf(snaps), hq_history: () => history }, HQ);
  const wakura = page.getByTestId('hq-row').filter({ hasText: '和倉小学校' });
  const notojima = page.getByTestId('hq-row').filter({ hasText: '能登島小学校' });
  await expect(wakura.getByTestId('hq-activity')).toContainText('1時間前');
  await expect(wakura.getByTestId('hq-stale')).toHaveCount(0);
  await expect(notojima.getByTestId('hq-activity')).toContainText('15時間前');
  await expect(notojima.getByTestId('hq-stale')).toHaveText('12時間以上動きなし');
});

test('HQ marks a supply request arranged', async ({ page }) => {
  let requests = [BLANKETS];
  const app = await openApp(
    page,
    {
      hq_summary: () => summaryOf(FIRST, requests),
      hq_history: () => historyOf(),
      hq_set_request_status: ({ shelter, request, status }) => {
        if (request !== 'r1') fail('invalid_input', 'unknown request');
        requests = requests.map((r) => (r.id === request && r.shelter === shelter ? { ...r, status } : r));
        return null;
      },
    },
    HQ,
  );
  const req = page.getByTestId('hq-request');
  await expect(req).toHaveCount(1);
  await expect(req).toContainText('毛布');
  await expect(req).toContainText('200枚');
  await expect(req).toContainText('石崎小学校');
  await expect(req).toContainText('要請中');
  await req.getByTestId('request-arranged').click();
  await expect(req).toContainText('手配済');
  await expect(req.getByTestId('request-delivered')).toBeVisible();
  expect(app.callsTo('hq_set_request_status')[0]).toEqual({ shelter: docId('CC0000000561'), request: 'r1', status: 'arranged' });
});

test('HQ exports the roster to a file chosen in the save dialog', async ({ page }) => {
  let answer: string | null = '/home/hq/避難者名簿.csv';
  const app = await openApp(
    page,
    {
      hq_summary: () => summaryOf(FIRST),
      hq_history: () => historyOf(),
      'plugin:dialog|save': () => answer,
      hq_export_roster: ({ path }) => ({ path, rows: 1794, bytes: 301_233 }),
      hq_export_aggregate: ({ path }) => (path.startsWith('/') ? { path, rows: 29, bytes: 4_100 } : fail('invalid_input', 'relative path')),
    },
    HQ,
  );
  await page.getByTestId('export-roster').click();
  await expect(page.getByTestId('export-done')).toContainText('1794 行');
  await expect(page.getByTestId('export-done')).toContainText('/home/hq/避難者名簿.csv');
  expect(app.callsTo('hq_export_roster')[0].path).toBe('/home/hq/避難者名簿.csv');
  const dialog = app.callsTo('plugin:dialog|save')[0].options;
  expect(dialog.defaultPath).toMatch(/^避難者名簿_\d{8}-\d{4}\.csv$/);
  expect(dialog.filters[0].extensions).toEqual(['csv']);

  // Cancelling the dialog writes nothing.
  answer = null;
  await page.getByTestId('export-aggregate').click();
  await expect.poll(() => app.callsTo('plugin:dialog|save').length).toBe(2);
  expect(app.callsTo('hq_export_aggregate')).toHaveLength(0);

  // A failure reads as what to do.
  answer = 'relative.csv';
  await page.getByTestId('export-aggregate').click();
  await expect(page.getByRole('alert')).toContainText('入力内容に誤りがあります');
});
