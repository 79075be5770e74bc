import { test, expect } from '@playwright/test';
import { EVENTS, LAST_SYNC_MS, openApp } from './support/mock';

test('the status bar follows the sync state as it changes', async ({ page }) => {
  const app = await openApp(page, {}, { sync: { state: 'online', pending: 0, last_sync_ms: LAST_SYNC_MS } });
  const state = page.getByTestId('sync-state');

  await expect(state).toHaveText('オンライン');
  await expect(page.getByTestId('sync-last')).toHaveText('最終同期 14:05');
  await expect(page.getByTestId('sync-pending')).toHaveCount(0);

  // The network goes away while the clerk keeps working: unsent edits pile up.
  await app.setSync({ state: 'offline', pending: 1 });
  await expect(state).toHaveText('オフライン — 未送信 1 件');
  await app.setSync({ state: 'offline', pending: 3 });
  await expect(state).toHaveText('オフライン — 未送信 3 件');

  // A colleague's computer on the same LAN is found.
  await app.setSync({ state: 'lan', lan_peers: 1 });
  await expect(state).toHaveText('LAN内の端末と同期中');
  await expect(page.getByTestId('sync-pending')).toHaveText('未送信 3 件');

  // The relay comes back; the edits go out and the time of the last sync moves on.
  await app.setSync({ state: 'connecting', lan_peers: 0 });
  await expect(state).toHaveText('中継サーバーに接続中');
  await app.emit(EVENTS.syncStatus, {
    state: 'online',
    pending: 0,
    last_sync_ms: Date.UTC(2025, 0, 9, 7, 42), // 16:42 in Japan
    lan_peers: 0,
    message: null,
    relay_behind: null,
    quarantined: [],
    quarantined_total: 0,
    held_back: 0,
  });
  await expect(state).toHaveText('オンライン');
  await expect(page.getByTestId('sync-last')).toHaveText('最終同期 16:42');
  await expect(page.getByTestId('sync-pending')).toHaveCount(0);

  // The relay refuses this computer: the clerk is told whom to contact.
  await app.setSync({ state: 'refused', message: 'device revoked' });
  await expect(state).toHaveText('中継サーバーに接続を拒否されました。中継サーバーの管理者に連絡してください。');
});

test('“Sync now” asks the engine to sync', async ({ page }) => {
  const app = await openApp(page, {}, { sync: { state: 'offline', pending: 2 } });
  await expect(page.getByTestId('sync-state')).toHaveText('オフライン — 未送信 2 件');
  await page.getByTestId('sync-now').click();
  await expect.poll(() => app.callsTo('sync_now').length).toBe(1);
  // And from the keyboard.
  await page.getByTestId('sync-now').focus();
  await page.keyboard.press('Enter');
  await expect.poll(() => app.callsTo('sync_now').length).toBe(2);
});

test('a computer that has never synced says so, in English too', async ({ page }) => {
  const app = await openApp(page, {}, { lang: 'en', sync: { state: 'connecting', last_sync_ms: null, pending: 4 } });
  await expect(page.getByTestId('sync-state')).toHaveText('Connecting to the relay');
  await expect(page.getByTestId('sync-pending')).toHaveText('4 unsent');
  await expect(page.getByTestId('sync-last')).toHaveText('Never synced');
  await app.setSync({ state: 'offline' });
  await expect(page.getByTestId('sync-state')).toHaveText('Offline — 4 unsent');
  await expect(page.getByTestId('sync-now')).toHaveText('Sync now');
});

test('when the relay went back in time, the clerk is told once, with the time, and settings keep it', async ({ page }) => {
  const app = await openApp(page, { referral_list: () => [] });
  const notice = page.getByTestId('relay-behind');
  await expect(notice).toHaveCount(0);

  // The relay was rolled back; this computer offered what it holds again.
  await app.setSync({ relay_behind: { at_ms: LAST_SYNC_MS, restored: false, times: 1 } });
  await expect(notice).toContainText('中継サーバーが以前の状態に戻ったため、この端末のデータを再送しました(2025年1月9日 14:05)');
  await page.screenshot({ path: 'test-results/screenshots/status-relay-behind.png' });
  await page.getByTestId('relay-behind-ok').click();
  await expect(notice).toHaveCount(0);

  // Acknowledged: not shown again after a restart, but settings still say it happened.
  await page.reload();
  await expect(page.getByTestId('sync-state')).toHaveText('オンライン');
  await expect(notice).toHaveCount(0);
  await page.getByTestId('nav-settings').click();
  await expect(page.getByTestId('settings-relay-behind')).toContainText('この端末のデータを再送しました(2025年1月9日 14:05)');
  await expect(page.getByTestId('settings-relay-behind')).toContainText('これまでに 1 回');

  // Later the relay is restored from a backup: told again.
  await app.setSync({ relay_behind: { at_ms: Date.UTC(2025, 0, 10, 0, 30), restored: true, times: 2 } });
  await expect(notice).toContainText('中継サーバーがバックアップから復元され以前の状態に戻ったため、この端末のデータを再送しました(2025年1月10日 09:30)');
  await expect(page.getByTestId('settings-relay-behind')).toContainText('これまでに 2 回');
});

test('updates a member sent that could not be applied are named with who sent them, until acknowledged', async ({ page }) => {
  const app = await openApp(page, { referral_list: () => [] });
  const notice = page.getByTestId('quarantine');
  await expect(notice).toHaveCount(0);
  const quarantined = [
    {
      bundle: '9f3a61c2d4e5f607',
      document: '0193f6a2-0000-7000-8000-000000000001',
      facility: '港診療所',
      device: '12D3KooWThief',
      reason: 'the bundle\'s changes inflate to more than 16777216 bytes',
      at_ms: LAST_SYNC_MS,
    },
    {
      bundle: '1b2c3d4e5f607182',
      document: '0193f6a2-0000-7000-8000-000000000001',
      facility: '外部診療所',
      device: '12D3KooWOutsider',
      reason: 'facility 0193 is not a member of this document',
      at_ms: LAST_SYNC_MS - 1000,
    },
  ];
  await app.setSync({ quarantined, quarantined_total: 2 });
  await expect(notice).toContainText('受信した更新 2 件を隔離しました(適用していません)。文書はそのまま読めます。送信元: 港診療所、外部診療所');
  await notice.getByText('隔離した更新の一覧').click();
  await expect(page.getByTestId('quarantine-list')).toContainText('港診療所 の端末 12D3KooWThief: the bundle\'s changes inflate');
  await page.screenshot({ path: 'test-results/screenshots/status-quarantine.png' });
  await page.getByTestId('quarantine-ok').click();
  await expect(notice).toHaveCount(0);

  // Acknowledged: not shown again after a restart; a newer one is.
  await page.reload();
  await expect(page.getByTestId('sync-state')).toHaveText('オンライン');
  await expect(notice).toHaveCount(0);
  await app.setSync({
    quarantined: [{ ...quarantined[0], bundle: 'aaaaaaaaaaaaaaaa', at_ms: LAST_SYNC_MS + 60_000 }, ...quarantined],
    quarantined_total: 3,
  });
  await expect(notice).toContainText('受信した更新 3 件');
});

test('edits the relay holds back for a full storage quota are said to be kept until sent', async ({ page }) => {
  const app = await openApp(page, {}, { sync: { state: 'online', pending: 2, held_back: 2 } });
  const notice = page.getByTestId('held-back');
  await expect(notice).toContainText('保存容量が上限に達した');
  await expect(notice).toContainText('変更 2 件');
  await expect(notice).toContainText('失われません');
  // The operator raised the quota: the edits went out and the notice goes.
  await app.setSync({ pending: 0, held_back: 0 });
  await expect(notice).toHaveCount(0);
});

test('the held-back notice in English', async ({ page }) => {
  await openApp(page, {}, { lang: 'en', sync: { state: 'online', pending: 1, held_back: 1 } });
  await expect(page.getByTestId('held-back')).toContainText('storage at the relay is full: 1 change(s) are kept');
});
