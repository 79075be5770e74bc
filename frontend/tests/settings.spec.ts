import { test, expect } from '@playwright/test';
import { openApp } from './support/mock';

test('settings show the relay, the facility and this computer’s key fingerprint', async ({ page }) => {
  await openApp(
    page,
    {},
    {
      facility: { name: '七尾市居宅介護支援事業所', role: 'care-office' },
      settings: {
        fingerprint: 'a1b2 c3d4 e5f6 0718 293a 4b5c 6d7e 8f90',
        relay_addrs: ['/ip4/192.168.10.2/udp/4433/quic-v1'],
        data_dir: '/srv/musubi/care',
        version: '0.3.1',
      },
    },
  );
  await page.getByTestId('nav-settings').click();

  await expect(page.getByRole('heading', { name: '設定', level: 1 })).toBeVisible();
  await expect(page.getByTestId('fingerprint')).toHaveText('a1b2c3d4e5f60718293a4b5c6d7e8f90');
  await expect(page.getByTestId('fingerprint').locator('.group')).toHaveText([
    'a1b2', 'c3d4', 'e5f6', '0718', '293a', '4b5c', '6d7e', '8f90',
  ]);
  await expect(page.getByTestId('relay-addrs')).toHaveText('/ip4/192.168.10.2/udp/4433/quic-v1');
  await expect(page.getByTestId('settings-sync-state')).toHaveText('オンライン');
  await expect(page.getByTestId('facility-name')).toHaveText('七尾市居宅介護支援事業所');
  await expect(page.getByTestId('facility-role')).toHaveText('居宅介護支援事業所');
  await expect(page.getByTestId('data-dir')).toHaveText('/srv/musubi/care');
  await expect(page.getByTestId('version')).toHaveText('0.3.1');
  await expect(page.getByTestId('staff-list')).toContainText('山田 花子');
});

test('switching to English changes the words everywhere, and the choice is kept', async ({ page }) => {
  await openApp(page, {}, { path: '#/settings' });
  await expect(page.getByTestId('nav-careplan')).toHaveText('ケアプラン');

  await page.getByTestId('language').selectOption('en');

  await expect(page.getByRole('heading', { name: 'Settings', level: 1 })).toBeVisible();
  await expect(page.getByTestId('nav-careplan')).toHaveText('Care plans');
  await expect(page.getByTestId('nav-reception')).toHaveText('Shelter reception');
  await expect(page.getByTestId('sync-state')).toHaveText('Online');
  await expect(page.getByTestId('sign-out')).toHaveText('Sign out');
  await expect(page.getByTestId('facility-role')).toHaveText('Clinic / hospital');
  await expect(page.locator('html')).toHaveAttribute('lang', 'en');

  await page.reload();
  await expect(page.getByRole('heading', { name: 'Settings', level: 1 })).toBeVisible();
  await expect(page.getByTestId('language')).toHaveValue('en');

  await page.getByTestId('language').selectOption('ja');
  await expect(page.getByRole('heading', { name: '設定', level: 1 })).toBeVisible();
});

test('a signed-in clerk adds a colleague’s staff account', async ({ page }) => {
  const app = await openApp(page, {}, { path: '#/settings' });
  await expect(page.getByTestId('staff-list').locator('tbody tr')).toHaveCount(1);

  // A short password is pointed out first.
  await page.locator('#new-staff-login').fill('tanaka');
  await page.locator('#new-staff-name').fill('田中 次郎');
  await page.locator('#new-staff-password').fill('1234');
  await page.locator('#new-staff-password').press('Enter');
  await expect(page.getByTestId('validation')).toHaveText('パスワードは8文字以上で入力してください。');
  await expect(page.locator('#new-staff-password')).toBeFocused();
  expect(app.callsTo('create_staff')).toHaveLength(0);

  await page.locator('#new-staff-password').fill('tanaka-pass-1');
  await page.locator('#new-staff-password').press('Enter');
  await expect(page.getByTestId('staff-added')).toHaveText('田中 次郎 さんのアカウントを作成しました。');
  const rows = page.getByTestId('staff-list').locator('tbody tr');
  await expect(rows).toHaveCount(2);
  await expect(rows.nth(1)).toContainText('田中 次郎');
  await expect(rows.nth(1)).toContainText('tanaka');
  await expect(page.locator('#new-staff-login')).toHaveValue('');
  expect(app.callsTo('create_staff')).toEqual([{ login: 'tanaka', name: '田中 次郎', password: 'tanaka-pass-1', role: 'staff' }]);

  // The same login again: the engine refuses, and the clerk sees why.
  await page.locator('#new-staff-login').fill('tanaka');
  await page.locator('#new-staff-name').fill('田中 三郎');
  await page.locator('#new-staff-password').fill('another-pass');
  await page.locator('#new-staff-password').press('Enter');
  const alert = page.getByRole('alert');
  await expect(alert).toContainText('入力内容に誤りがあります。');
  await expect(alert).toContainText('a staff account "tanaka" already exists');
  await expect(rows).toHaveCount(2);
});
