// 避難所受付: a volunteer at a community centre's desk, with the engine mocked at the IPC boundary.
// The fake desk (tests/support/desk.ts) keeps a roster as the engine's Desk does, so counts, search and
// stays behave like the real commands.

import { test, expect, type Page } from '@playwright/test';
import { openApp, fail } from './support/mock';
import { FakeDesk, SHELTER_ID, openDesk } from './support/desk';

function count(page: Page) {
  return page.getByTestId('shelter-count');
}

test('a volunteer checks in a family member by typing a name and pressing Enter', async ({ page }) => {
  const desk = new FakeDesk();
  desk.add({ name: '能登 太郎', kana: 'のと たろう', birth_date: '1948-05-05', presence: 'present' });
  desk.add({ name: '能登 花子', kana: 'のと はなこ', birth_date: '1950-01-02', presence: 'out', flags: ['elderly'] });
  const app = await openDesk(page, desk);

  await expect(page.getByTestId('shelter-present')).toHaveText('1');
  await expect(count(page)).toContainText('50');

  // Kana in katakana still finds her; the first match is chosen and Enter checks her in.
  await page.locator('#reception-search').pressSequentially('ノトハナ');
  const rows = page.getByTestId('evacuee-row');
  await expect(rows).toHaveCount(1);
  await expect(rows.first()).toContainText('能登 花子');
  await expect(rows.first().getByTestId('evacuee-presence')).toHaveText('退所');
  await page.keyboard.press('Enter');

  const done = page.getByTestId('checkin-done');
  await expect(done).toBeVisible();
  await expect(done).toContainText('能登 花子');
  await expect(done).toContainText(/入所 \d{2}:\d{2}/);
  await expect(page.getByTestId('shelter-present')).toHaveText('2');

  const call = app.callsTo('desk_checkin')[0];
  expect(call.person).toMatchObject({ name: '能登 花子', birth_date: '1950-01-02' });
  // The field is empty and focused again for the next person.
  await expect(page.locator('#reception-search')).toHaveValue('');
  await expect(page.locator('#reception-search')).toBeFocused();
});

test('a newcomer nobody knows yet is registered from what was typed, then checked in', async ({ page }) => {
  const desk = new FakeDesk();
  desk.add({ name: '能登 太郎', kana: 'のと たろう', birth_date: '1948-05-05' });
  const app = await openDesk(page, desk);

  await page.locator('#reception-search').fill('七尾 次郎');
  await expect(page.getByTestId('no-match')).toBeVisible();
  await page.locator('#reception-search').press('Enter');

  // The form opens with the typed name; the birth date in 和暦 is read as a date.
  await expect(page.locator('#evacuee-name')).toHaveValue('七尾 次郎');
  await expect(page.locator('#evacuee-kana')).toBeFocused();
  await page.locator('#evacuee-kana').fill('ななお じろう');
  await page.locator('#evacuee-birth').fill('昭和30年4月1日');
  await expect(page.getByTestId('birth-read')).toContainText('1955-04-01');
  await page.getByTestId('flag-medical-care').click();
  await expect(page.getByTestId('flag-medical-care')).toHaveAttribute('aria-pressed', 'true');
  await page.getByTestId('add-relative').click();
  await page.locator('input[data-relative-name]').fill('七尾 花');
  await page.locator('input[data-relative-email]').fill('hana@example.jp');
  await page.getByTestId('checkin-submit').click();

  await expect(page.getByTestId('checkin-done')).toContainText('七尾 次郎');
  await expect(page.getByTestId('checkin-done')).toContainText('1 名');
  await expect(page.getByTestId('shelter-present')).toHaveText('2');
  const call = app.callsTo('desk_checkin')[0];
  expect(call.person).toMatchObject({
    name: '七尾 次郎',
    kana: 'ななお じろう',
    birth_date: '1955-04-01',
    flags: ['medical-care'],
    relatives: [{ name: '七尾 花', email: 'hana@example.jp' }],
  });
  expect(call.method).toBe('manual');
});

test('a manual registration without a birth date is stopped with a sentence, and Escape goes back', async ({ page }) => {
  const desk = new FakeDesk();
  const app = await openDesk(page, desk);
  await page.locator('#reception-search').fill('珠洲 三郎');
  await page.locator('#reception-search').press('Enter');
  await page.getByTestId('checkin-submit').click();
  await expect(page.getByRole('alert')).toContainText('生年月日を入力してください');
  await expect(page.locator('#evacuee-birth')).toBeFocused();
  expect(app.callsTo('desk_checkin')).toHaveLength(0);
  await page.keyboard.press('Escape');
  await expect(page.locator('#evacuee-name')).toHaveCount(0);
  await expect(page.locator('#reception-search')).toBeFocused();
});

test('a resident taps a card and is checked in without typing', async ({ page }) => {
  const desk = new FakeDesk();
  desk.add({ name: '和倉 一郎', kana: 'わくら いちろう', birth_date: '1960-02-03', card_id: 'ab12cd34', presence: 'out' });
  const app = await openDesk(page, desk);
  await expect(page.getByTestId('shelter-present')).toHaveText('0');

  await app.emit('card-tapped', { card_id: 'ab12cd34', card_kind: 'contactless', at_ms: Date.now() });

  await expect(page.getByTestId('checkin-done')).toContainText('和倉 一郎');
  await expect(page.getByTestId('shelter-present')).toHaveText('1');
  const call = app.callsTo('desk_checkin')[0];
  expect(call.cardId).toBe('ab12cd34');
  expect(call.method).toBe('transit-card');
});

test('an unknown card opens the new-evacuee form bound to that card', async ({ page }) => {
  const desk = new FakeDesk();
  const app = await openDesk(page, desk);

  await app.emit('card-tapped', { card_id: 'ffee0011', card_kind: 'my_number', at_ms: Date.now() });
  await expect(page.getByTestId('new-evacuee-card')).toContainText('マイナンバーカード');
  await expect(page.getByTestId('form-note')).toContainText('登録のないカード');
  await page.locator('#evacuee-name').fill('中島 みどり');
  // With a card the birth date may stay empty.
  await page.getByTestId('checkin-submit').click();

  await expect(page.getByTestId('checkin-done')).toContainText('中島 みどり');
  const calls = app.callsTo('desk_checkin');
  expect(calls.at(-1)).toMatchObject({ cardId: 'ffee0011', method: 'my-number-card', person: { name: '中島 みどり' } });
  await expect(page.getByTestId('shelter-present')).toHaveText('1');
});

test('marking 外泊 then 退所', async ({ page }) => {
  const desk = new FakeDesk();
  desk.add({ name: '田鶴浜 進', kana: 'たつるはま すすむ', birth_date: '1970-07-07', presence: 'present' });
  desk.add({ name: '能登 太郎', kana: 'のと たろう', birth_date: '1948-05-05', presence: 'present' });
  const app = await openDesk(page, desk);
  await expect(page.getByTestId('shelter-present')).toHaveText('2');

  await page.locator('#reception-search').fill('たつるはま');
  const row = page.getByTestId('evacuee-row').filter({ hasText: '田鶴浜 進' });
  await expect(page.getByTestId('evacuee-row')).toHaveCount(1);
  await row.getByTestId('stay-leave').click();

  await expect(row.getByTestId('evacuee-presence')).toHaveText('外泊');
  await expect(page.getByTestId('stay-done')).toContainText('田鶴浜 進');
  // 外泊 still counts as present; the away figure goes up.
  await expect(page.getByTestId('shelter-present')).toHaveText('2');
  await expect(page.getByTestId('shelter-on-leave')).toHaveText('1');
  // Now the row offers 戻り and 退所.
  await expect(row.getByTestId('stay-return')).toBeVisible();
  await row.getByTestId('stay-check-out').click();

  await expect(row.getByTestId('evacuee-presence')).toHaveText('退所');
  await expect(page.getByTestId('shelter-present')).toHaveText('1');
  await expect(page.getByTestId('shelter-on-leave')).toHaveText('0');
  await expect(row.getByTestId('stay-check-in')).toBeVisible();
  expect(app.callsTo('desk_stay').map((c) => c.kind)).toEqual(['leave', 'check-out']);
});

test('要配慮 flags are visible on the row', async ({ page }) => {
  const desk = new FakeDesk();
  desk.add({ name: '能登 太郎', kana: 'のと たろう', flags: ['medical-care', 'elderly'] });
  desk.add({ name: '能登 さくら', kana: 'のと さくら', flags: ['infant'] });
  desk.add({ name: '能登 一', kana: 'のと はじめ', flags: [] });
  await openDesk(page, desk);

  const taro = page.getByTestId('evacuee-row').filter({ hasText: '能登 太郎' });
  // Words, not colour alone, in the form's order.
  await expect(taro.getByTestId('care-flag')).toHaveText(['高齢者', '医療的ケア']);
  await expect(page.getByTestId('evacuee-row').filter({ hasText: '能登 さくら' }).getByTestId('care-flag')).toHaveText(['乳幼児']);
  await expect(page.getByTestId('evacuee-row').filter({ hasText: '能登 一' }).getByTestId('care-flag')).toHaveCount(0);
  // The badge differs in colour by flag as well.
  const bg = await taro.getByTestId('care-flag').evaluateAll((els) => els.map((e) => getComputedStyle(e).backgroundColor));
  expect(new Set(bg).size).toBe(2);
  await expect(page.getByTestId('shelter-count')).toContainText('要配慮者');
});

test('a check-in from another desk arrives live and the count updates', async ({ page }) => {
  const desk = new FakeDesk({ capacity: 10 });
  for (let i = 0; i < 8; i++) desk.add({ name: `避難者 ${i + 1}`, kana: `ひなんしゃ ${i + 1}` });
  const app = await openDesk(page, desk);
  await expect(page.getByTestId('shelter-present')).toHaveText('8');
  await expect(page.getByTestId('capacity-warning')).toHaveCount(0);

  desk.arriveFromElsewhere('輪島 陽子', 'わじま ようこ');
  await app.emit('document-changed', { id: SHELTER_ID, kind: 'shelter' });
  await expect(page.getByTestId('shelter-present')).toHaveText('9');
  await expect(page.getByRole('meter')).toHaveAttribute('aria-valuenow', '9');
  // 9 of 10: the 90 % warning shows.
  await expect(page.getByTestId('capacity-warning')).toContainText('90%');
  await expect(page.getByTestId('evacuee-row').filter({ hasText: '輪島 陽子' })).toBeVisible();

  // Changes of other kinds of documents do not reload the roster.
  const before = app.callsTo('desk_roster').length;
  await app.emit('document-changed', { id: 'x', kind: 'referral' });
  await page.waitForTimeout(200);
  expect(app.callsTo('desk_roster').length).toBe(before);
});

test('a community centre with no shelter yet opens one, then the desk is ready', async ({ page }) => {
  const desk = new FakeDesk();
  let opened = false;
  const app = await openApp(
    page,
    {
      ...desk.handlers(),
      shelter_list: () => (opened ? [desk.listing()] : []),
      shelter_open: (args) => {
        opened = true;
        return desk.handlers().shelter_open(args);
      },
    },
    { path: '#/reception', facility: { name: '御祓地区コミュニティセンター', role: 'shelter' } },
  );

  await expect(page.locator('#shelter-name')).toHaveValue('御祓地区コミュニティセンター');
  await page.locator('#shelter-capacity').fill('12x');
  await page.getByTestId('shelter-open').click();
  await expect(page.getByRole('alert')).toContainText('定員は数字で');
  await page.locator('#shelter-capacity').fill('120');
  await page.getByTestId('shelter-open').click();

  await expect(page.locator('#reception-search')).toBeFocused();
  await expect(page.getByTestId('shelter-count')).toContainText('0');
  await expect(page.getByTestId('shelter-capacity')).toHaveText('120');
  expect(app.callsTo('shelter_open')[0].request).toMatchObject({ name: '御祓地区コミュニティセンター', capacity: 120 });
  expect(app.callsTo('desk_open')[0].shelter).toBe(SHELTER_ID);
});

test('a failed check-in shows what to do, not the raw error', async ({ page }) => {
  const desk = new FakeDesk();
  desk.add({ name: '能登 花子', kana: 'のと はなこ', birth_date: '1950-01-02', presence: 'out' });
  await openDesk(page, desk);
  // Storage fails on this check-in.
  desk.checkin = () => fail('storage', 'database is locked');
  await page.locator('#reception-search').fill('のと');
  await expect(page.getByTestId('evacuee-row')).toHaveCount(1);
  await page.keyboard.press('Enter');
  const err = page.getByTestId('stay-error');
  await expect(err).toContainText('ディスクの空き容量を確認');
  await expect(page.getByTestId('checkin-done')).toHaveCount(0);
  await expect(page.getByTestId('shelter-present')).toHaveText('0');
});

test('the desk speaks English when chosen', async ({ page }) => {
  const desk = new FakeDesk();
  desk.add({ name: '能登 太郎', kana: 'のと たろう', flags: ['elderly'] });
  await openDesk(page, desk, { lang: 'en' });
  await expect(page.getByTestId('shelter-count')).toContainText('Present');
  await expect(page.getByTestId('care-flag')).toHaveText('Elderly');
  await expect(page.getByTestId('evacuee-presence')).toHaveText('Present');
  await expect(page.getByTestId('stay-leave')).toHaveText('Away');
});

test('the card reader’s state is shown: no reader is a normal state, and a reader coming back is noticed', async ({ page }) => {
  const desk = new FakeDesk();
  desk.reader = {
    available: false,
    state: 'no_reader',
    readers: [],
    message: 'カードリーダーが接続されていません。手入力で受付できます',
    message_en: 'No card reader is connected. Check people in by hand',
    last_error: null,
  };
  const app = await openDesk(page, desk);
  const reader = page.getByTestId('card-reader');
  await expect(reader).toContainText('カードリーダーが接続されていません');
  await expect(reader).toHaveAttribute('data-available', 'false');
  await app.emit('card-status', { ...desk.reader, available: true, state: 'ready', readers: ['PaSoRi'], message: 'カードをかざしてください', message_en: 'Hold a card' });
  await expect(reader).toContainText('カードをかざしてください');
  await expect(reader).toHaveAttribute('data-available', 'true');
  // Typing still works without a reader: the desk never depends on it.
  await expect(page.locator('#reception-search')).toBeFocused();
});
