import { test, expect } from '@playwright/test';
import {
  OTHER_DEVICE_FINGERPRINT,
  OTHER_DEVICE_ID,
  THIS_DEVICE_FINGERPRINT,
  fail,
  openApp,
} from './support/mock';

test('a clerk adds a second reception laptop with an invite code', async ({ page, context }) => {
  await context.grantPermissions(['clipboard-read', 'clipboard-write']);
  const app = await openApp(page, {}, { path: '#/settings' });

  // The facility's computers, this one marked.
  const rows = page.getByTestId('device-row');
  await expect(rows).toHaveCount(2);
  await expect(rows.nth(0)).toContainText(THIS_DEVICE_FINGERPRINT);
  await expect(rows.nth(0).getByTestId('this-device')).toHaveText('この端末');
  await expect(rows.nth(0).getByTestId('revoke-device')).toHaveCount(0);
  await expect(rows.nth(1)).toContainText(OTHER_DEVICE_FINGERPRINT);
  await expect(rows.nth(1).getByTestId('device-state')).toHaveText('使用中');

  // 「端末を追加」 for seven days: the code, its expiry and when it works.
  await page.locator('#invite-hours').selectOption({ label: '7日間' });
  await page.getByTestId('add-device').click();
  const code = page.getByTestId('device-invite-code');
  await expect(code).toHaveValue(/^musubi2/);
  expect(app.callsTo('device_invite')).toEqual([{ hours: 168 }]);
  await expect(page.getByTestId('device-invite-expires')).toContainText('有効期限:');
  await expect(page.getByTestId('device-invite-works')).toHaveText(
    'この招待コードは、この端末が中継サーバーと同期すると使えるようになります。新しい端末の「連携ネットワークに参加」に貼り付けてください。新しい端末が参加を申請すると、この端末が次に同期したときに自動で承認します。',
  );
  await expect(page.getByTestId('device-invite-offline')).toHaveCount(0);

  // Copied, to paste on the new laptop.
  await page.getByTestId('copy-invite').click();
  await expect(page.getByTestId('copied')).toHaveText('コピーしました');
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  expect(copied).toBe(app.state.device_invites[0].code);
  await page.setViewportSize({ width: 1280, height: 3000 });
  await page.getByTestId('devices').screenshot({ path: 'test-results/screenshots/settings-devices.png' });
  await page.setViewportSize({ width: 1280, height: 800 });

  // Offline: the clerk is told the code waits for this computer to connect.
  await app.setSync({ state: 'offline' });
  await expect(page.getByTestId('device-invite-offline')).toHaveText(
    'この端末はいま中継サーバーに接続していません。接続すると招待コードが使えるようになります。',
  );
});

test('a lost laptop is revoked after a confirmation, and shows as revoked once synced', async ({ page }) => {
  const app = await openApp(page, {}, { path: '#/settings' });
  const other = page.getByTestId('device-row').nth(1);
  const dialog = page.getByTestId('revoke-dialog');

  // Asked first; cancelling does nothing.
  await other.getByTestId('revoke-device').click();
  await expect(dialog.getByRole('heading', { name: 'この端末を失効させますか?' })).toBeVisible();
  await expect(page.getByTestId('revoke-target')).toHaveText(OTHER_DEVICE_FINGERPRINT);
  await expect(dialog).toContainText('元に戻すことはできません。');
  await page.getByTestId('revoke-dialog-cancel').click();
  await expect(dialog).not.toBeVisible();
  expect(app.callsTo('revoke_device')).toHaveLength(0);

  await other.getByTestId('revoke-device').click();
  await page.getByTestId('revoke-dialog-confirm').click();
  await expect(page.getByTestId('revoke-done')).toHaveText(
    '失効を送信しました。中継サーバーが受け付けると、文書の鍵が新しくなります。',
  );
  expect(app.callsTo('revoke_device')).toEqual([{ device: OTHER_DEVICE_ID }]);
  await expect(other.getByTestId('device-state')).toHaveText('失効を送信待ち');
  await expect(other.getByTestId('revoke-device')).toHaveCount(0);

  // The relay took it; the next directory says revoked.
  const laptop = app.state.devices[1];
  laptop.revoking = false;
  laptop.revoked = true;
  await app.setSync({ last_sync_ms: Date.now() });
  await expect(other.getByTestId('device-state')).toHaveText('失効済み');
});

test('revoking a computer that is no longer current is refused with a sentence', async ({ page }) => {
  await openApp(
    page,
    { revoke_device: ({ device }) => fail('not_found', `${device} is not a current device of this facility`) },
    { path: '#/settings' },
  );
  await page.getByTestId('device-row').nth(1).getByTestId('revoke-device').click();
  await page.getByTestId('revoke-dialog-confirm').click();
  const alert = page.getByTestId('devices').getByRole('alert');
  await expect(alert).toContainText('対象が見つかりません。「今すぐ同期」を押してから、もう一度お試しください。');
  await expect(alert).toContainText('is not a current device of this facility');
});
