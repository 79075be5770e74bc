import { test, expect } from '@playwright/test';
import { openApp } from './support/mock';

test('a clerk unlocks the computer, signs in, moves between screens and signs out', async ({ page }) => {
  const app = await openApp(page, {}, { phase: 'locked', passphrase: 'nanao-clinic-2024' });

  await expect(page.getByRole('heading', { name: 'ロック解除' })).toBeVisible();
  await expect(page.locator('#unlock-passphrase')).toBeFocused();
  await expect(page.getByTestId('sync-state')).toHaveCount(0);

  // A wrong passphrase: a sentence that says what to do, and the field is ready for another try.
  await page.locator('#unlock-passphrase').fill('nanao-clinic-2023');
  await page.locator('#unlock-passphrase').press('Enter');
  await expect(page.getByRole('alert')).toContainText('パスフレーズが違います。もう一度入力してください。');
  await expect(page.locator('#unlock-passphrase')).toHaveValue('');
  await expect(page.locator('#unlock-passphrase')).toBeFocused();

  await page.locator('#unlock-passphrase').fill('nanao-clinic-2024');
  await page.locator('#unlock-passphrase').press('Enter');

  // Unlocked: the sign-in form, with the facility's name and the status bar.
  await expect(page.getByRole('heading', { name: '職員ログイン' })).toBeVisible();
  await expect(page.getByText('施設: 七尾市立診療所')).toBeVisible();
  await expect(page.getByTestId('sync-state')).toHaveText('オンライン');

  // A wrong password.
  await page.locator('#login').fill('yamada');
  await page.locator('#password').fill('password999');
  await page.locator('#password').press('Enter');
  await expect(page.getByRole('alert')).toContainText('ログインIDまたはパスワードが違います。もう一度入力してください。');
  await expect(page.locator('#password')).toHaveValue('');

  await page.locator('#password').fill('password123');
  await page.locator('#password').press('Enter');

  // Signed in: the clerk's own name, and the work screens.
  await expect(page.getByTestId('staff-name')).toHaveText('山田 花子 さん');
  await expect(page.getByTestId('nav-referral')).toHaveAttribute('aria-current', 'page');

  // The menu works from the keyboard.
  await page.getByTestId('nav-referral').focus();
  await page.keyboard.press('Tab');
  await expect(page.getByTestId('nav-careplan')).toBeFocused();
  await page.keyboard.press('Enter');
  await expect(page).toHaveURL(/#\/careplan$/);
  await expect(page.getByTestId('nav-careplan')).toHaveAttribute('aria-current', 'page');
  await page.getByTestId('nav-settings').click();
  await expect(page.getByRole('heading', { name: '設定', level: 1 })).toBeVisible();

  // Signing out returns to the sign-in form; the computer stays unlocked.
  await page.getByTestId('sign-out').click();
  await expect(page.getByRole('heading', { name: '職員ログイン' })).toBeVisible();
  await expect(page.getByTestId('staff-name')).toHaveCount(0);
  await expect(page.getByTestId('sync-state')).toBeVisible();

  expect(app.callsTo('unlock')).toEqual([{ passphrase: 'nanao-clinic-2023' }, { passphrase: 'nanao-clinic-2024' }]);
  expect(app.callsTo('sign_in')).toEqual([
    { login: 'yamada', password: 'password999' },
    { login: 'yamada', password: 'password123' },
  ]);
  expect(app.callsTo('sign_out')).toHaveLength(1);
});

test('after five wrong passwords sign-in pauses, and the clerk is told to wait', async ({ page }) => {
  const app = await openApp(page, {}, { phase: 'signed_out' });
  for (let i = 0; i < 5; i++) {
    await page.locator('#login').fill('yamada');
    await page.locator('#password').fill(`guess-${i}`);
    await page.locator('#password').press('Enter');
    await expect(page.getByRole('alert')).toContainText('ログインIDまたはパスワードが違います。');
  }
  // Even the right password now waits out the pause.
  await page.locator('#login').fill('yamada');
  await page.locator('#password').fill('password123');
  await page.locator('#password').press('Enter');
  await expect(page.getByRole('alert')).toContainText('サインインをしばらく停止しています');
  await expect(page.getByRole('alert')).toContainText('30秒ほど待ってから、もう一度入力してください。');
  await expect(page.getByTestId('staff-name')).toHaveCount(0);
  expect(app.callsTo('sign_in')).toHaveLength(6);
  // Every refusal is in the audit log, naming the login tried and why.
  expect(app.state.audit.map((e) => [e.action, e.staff, e.fields])).toEqual([
    ...Array(5).fill(['sign-in-failed', 'yamada', ['password']]),
    ['sign-in-failed', 'yamada', ['locked']],
  ]);

  // In English too.
  await page.evaluate(() => localStorage.setItem('musubi.lang', 'en'));
  await page.reload();
  await page.locator('#login').fill('yamada');
  await page.locator('#password').fill('password123');
  await page.locator('#password').press('Enter');
  await expect(page.getByRole('alert')).toContainText('Too many wrong passwords: sign-in for this account is paused for a while. Wait about 30 seconds');
});

test('the pause holds at the lock screen too: the same rules for signing in again', async ({ page }) => {
  const app = await openApp(page, { referral_list: () => [] }, { path: '#/referral' });
  await page.getByTestId('lock-screen-now').click();
  await expect(page.getByTestId('lock-screen')).toBeVisible();
  for (let i = 0; i < 5; i++) {
    await page.locator('#password').fill(`guess-${i}`);
    await page.locator('#password').press('Enter');
    await expect(page.getByRole('alert')).toContainText('ログインIDまたはパスワードが違います。');
  }
  await page.locator('#password').fill('password123');
  await page.locator('#password').press('Enter');
  await expect(page.getByRole('alert')).toContainText('サインインをしばらく停止しています');
  await expect(page.getByTestId('lock-screen')).toBeVisible();
  await expect(page.getByTestId('work')).toBeHidden();
  expect(app.state.audit.at(-1)).toMatchObject({ action: 'sign-in-failed', staff: 'yamada', fields: ['locked'] });
});

test('empty sign-in fields are pointed out before asking the engine', async ({ page }) => {
  const app = await openApp(page, {}, { phase: 'signed_out' });
  await page.locator('#login').press('Enter');
  await expect(page.getByRole('alert')).toHaveText('ログインIDとパスワードを入力してください。');
  expect(app.callsTo('sign_in')).toHaveLength(0);
});

test('when the data cannot be read at start, the clerk is told what to do and can try again', async ({ page }) => {
  let broken = true;
  await openApp(
    page,
    {
      app_status: (_a, app) => {
        if (broken) throw { kind: 'storage', message: 'database disk image is malformed' };
        return { phase: 'signed_out', facility_name: '七尾市立診療所', facility_role: 'clinic', staff: null, data_dir: app.state.data_dir };
      },
    },
    { phase: 'signed_out' },
  );
  const alert = page.getByRole('alert');
  await expect(alert).toContainText('この端末のデータを読み書きできませんでした。');
  await expect(alert).toContainText('database disk image is malformed');
  broken = false;
  await alert.getByRole('button', { name: 'もう一度試す' }).click();
  await expect(page.getByRole('heading', { name: '職員ログイン' })).toBeVisible();
});
