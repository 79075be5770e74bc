import { test, expect } from '@playwright/test';
import { defaultHandlers, deferred, openApp } from './support/mock';

test('a new clerk sets up the facility, joins the network and lands signed in', async ({ page }) => {
  const keys = deferred();
  const relay = deferred();
  const app = await openApp(
    page,
    {
      create_facility: async (args, app) => {
        await keys.promise;
        return defaultHandlers.create_facility(args, app);
      },
      join: async (args, app) => {
        if (String(args.invite).startsWith('musubi2')) await relay.promise;
        return defaultHandlers.join(args, app);
      },
    },
    { phase: 'new' },
  );

  await expect(page.getByRole('heading', { name: '初回設定' })).toBeVisible();
  // No status bar while nothing is unlocked.
  await expect(page.getByTestId('sync-state')).toHaveCount(0);

  // A passphrase that is too short is refused with a sentence, before asking the engine.
  await page.locator('#facility-name').fill('七尾市立診療所');
  await page.locator('#passphrase').fill('nanao');
  await page.locator('#passphrase-confirm').fill('nanao');
  await page.locator('#passphrase-confirm').press('Enter');
  await expect(page.getByRole('alert')).toHaveText('パスフレーズは8文字以上で入力してください。');
  await expect(page.locator('#passphrase')).toBeFocused();

  // A confirmation that differs is refused too.
  await page.locator('#passphrase').fill('nanao-clinic-2024');
  await page.locator('#passphrase-confirm').fill('nanao-clinic-2025');
  await page.locator('#passphrase-confirm').press('Enter');
  await expect(page.getByRole('alert')).toHaveText('確認用のパスフレーズが一致しません。同じものを2回入力してください。');
  expect(app.callsTo('create_facility')).toHaveLength(0);

  // While the keys are made, the clerk sees that the app is working.
  await page.locator('#passphrase-confirm').fill('nanao-clinic-2024');
  await page.locator('#passphrase-confirm').press('Enter');
  await expect(page.getByRole('status').filter({ hasText: '暗号鍵を作成しています…' })).toBeVisible();
  await expect(page.getByTestId('create-facility')).toBeDisabled();
  keys.resolve();
  expect(app.callsTo('create_facility')).toEqual([{ name: '七尾市立診療所', passphrase: 'nanao-clinic-2024' }]);

  // Next: the invite code. A wrong one gets a sentence saying what to do.
  await expect(page.getByRole('heading', { name: '連携ネットワークに参加' })).toBeVisible();
  await expect(page.getByText('施設: 七尾市立診療所')).toBeVisible();
  await expect(page.getByTestId('sync-state')).toHaveText('連携ネットワークに未参加');
  await page.locator('#invite').fill('hello-relay');
  await page.locator('#invite').press('Enter');
  await expect(page.getByRole('alert')).toContainText(
    'これは結びの招待コードではありません。musubi2 で始まる招待コードを、途中で切れないよう1行すべて貼り付けてください。',
  );

  // The right code: what it enrols shows before joining; joining takes a while and says so.
  await page.locator('#invite').fill('musubi2qWx3ZmFjaWxpdHk');
  await expect(page.getByTestId('invite-kind')).toHaveText('新しい施設の登録');
  await page.locator('#invite').press('Enter');
  await expect(page.getByText('中継サーバーに問い合わせています(最大20秒かかります)…')).toBeVisible();
  relay.resolve();

  // The first staff account; a short password is refused first.
  await expect(page.getByRole('heading', { name: '最初の職員アカウントを作成' })).toBeVisible();
  await page.locator('#staff-login').fill('sato');
  await page.locator('#staff-name').fill('佐藤 一郎');
  await page.locator('#staff-password').fill('short');
  await page.locator('#staff-password').press('Enter');
  await expect(page.getByRole('alert')).toHaveText('パスワードは8文字以上で入力してください。');
  await page.locator('#staff-password').fill('sato-password');
  await page.locator('#staff-password').press('Enter');

  // Signed in: the work screens with the clerk's name and the sync status.
  await expect(page.getByTestId('staff-name')).toHaveText('佐藤 一郎 さん');
  await expect(page.getByTestId('nav-referral')).toBeVisible();
  await expect(page.getByTestId('sync-state')).toHaveText('オンライン');
  // A code that is not an invite never reaches the relay.
  expect(app.callsTo('join')).toEqual([{ invite: 'musubi2qWx3ZmFjaWxpdHk' }]);
  expect(app.callsTo('create_staff')).toEqual([{ login: 'sato', name: '佐藤 一郎', password: 'sato-password', role: null }]);
  expect(app.callsTo('sign_in')).toEqual([{ login: 'sato', password: 'sato-password' }]);
});

test('an empty facility name is refused before asking the engine', async ({ page }) => {
  await openApp(page, {}, { phase: 'new' });
  await page.locator('#facility-name').press('Enter');
  await expect(page.getByRole('alert')).toHaveText('施設名を入力してください。');
  await expect(page.locator('#facility-name')).toBeFocused();
});

test('when the relay cannot be reached while joining, the clerk is told to check the network', async ({ page }) => {
  await openApp(
    page,
    { join: () => { throw { kind: 'unreachable', message: 'the relay did not answer within 20 s' }; } },
    { phase: 'not_joined' },
  );
  await page.locator('#invite').fill('musubi2abc');
  await page.getByTestId('join').click();
  const alert = page.getByRole('alert');
  await expect(alert).toContainText('中継サーバーに接続できません。ネットワークを確認してください。');
  await expect(alert).toContainText('the relay did not answer within 20 s');
});
