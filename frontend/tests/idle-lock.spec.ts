import { test, expect, type Page } from '@playwright/test';
import { DEFAULT_STAFF, OTHER_STAFF, openApp, sleep } from './support/mock';

/** The referral inbox (the first screen after a fresh sign-in): empty. */
const inbox = { referral_list: () => [] };

/** What must not be on screen while the session is locked: the work screens and their content. */
async function expectNothingBehind(page: Page, draft: string) {
  await expect(page.getByTestId('work')).toBeHidden();
  await expect(page.locator('nav')).toBeHidden();
  await expect(page.locator('#new-staff-name')).toBeHidden();
  await expect(page.getByText(draft)).toHaveCount(0);
  await expect(page.getByTestId('sync-state')).toHaveCount(0);
  // Hidden, not blurred: nothing of the work screens is drawn at all.
  const drawn = await page.evaluate(() => {
    const work = document.querySelector('[data-testid=work]');
    return work ? work.getClientRects().length : -1;
  });
  expect(drawn).toBe(0);
}

test('after the idle time the screen locks and hides everything; the same clerk signs in again and finds the draft', async ({ page }) => {
  const app = await openApp(page, inbox, { path: '#/settings', idleLockMs: 2_000 });
  await expect(page.getByRole('heading', { name: '設定', level: 1 })).toBeVisible();

  // A draft: typed, not yet submitted.
  await page.locator('#new-staff-login').fill('kato');
  await page.locator('#new-staff-name').fill('加藤 下書き');

  // Nobody touches the computer: the lock screen covers everything.
  const lock = page.getByTestId('lock-screen');
  await expect(lock).toBeVisible({ timeout: 6_000 });
  await expect(lock.getByRole('heading', { name: '画面ロック中' })).toBeVisible();
  await expect(page.getByTestId('locked-staff')).toHaveText('山田 花子 さんの画面はロックされています');
  await expectNothingBehind(page, '加藤 下書き');
  expect(app.callsTo('lock_session')).toEqual([{ reason: 'idle' }]);
  expect(app.state.audit.at(-1)).toMatchObject({ action: 'lock', staff: 'yamada', fields: ['idle'] });

  // The engine refuses staff commands until someone signs in again.
  const answer = await page.evaluate(() =>
    (window as any).__TAURI_INTERNALS__.invoke('list_staff', {}).then(
      () => 'answered',
      (e: { kind: string }) => e.kind,
    ),
  );
  expect(answer).toBe('session_locked');

  // A wrong password first: said, and the screen stays locked.
  await expect(page.locator('#login')).toHaveValue('yamada');
  await expect(page.locator('#password')).toBeFocused();
  await page.locator('#password').fill('password999');
  await page.locator('#password').press('Enter');
  await expect(page.getByRole('alert')).toContainText('ログインIDまたはパスワードが違います。');
  await expectNothingBehind(page, '加藤 下書き');

  await page.locator('#password').fill('password123');
  await page.locator('#password').press('Enter');

  // Back where they were, the draft untouched.
  await expect(lock).toHaveCount(0);
  await expect(page.getByRole('heading', { name: '設定', level: 1 })).toBeVisible();
  await expect(page.locator('#new-staff-login')).toHaveValue('kato');
  await expect(page.locator('#new-staff-name')).toHaveValue('加藤 下書き');
  await expect(page.getByTestId('staff-name')).toHaveText('山田 花子 さん');
  await expect(page.getByTestId('sync-state')).toBeVisible();
  expect(app.state.audit.filter((e) => e.action !== 'audit-read').map((e) => e.action)).toEqual([
    'lock',
    'sign-in-failed',
    'sign-in',
  ]);
  expect(app.state.audit.at(-1)?.fields).toEqual(['password']);
});

test('while someone keeps working, the session stays open and the engine hears of it', async ({ page }) => {
  const app = await openApp(page, inbox, { path: '#/settings', idleLockMs: 2_000 });
  await page.locator('#new-staff-name').click();
  // Typing for twice the idle time.
  for (let i = 0; i < 10; i++) {
    await page.keyboard.type('a');
    await sleep(400);
  }
  await expect(page.getByTestId('lock-screen')).toHaveCount(0);
  expect(app.callsTo('lock_session')).toHaveLength(0);
  // Activity reports: at most one per quarter of the idle time.
  const touches = app.callsTo('session_touch').length;
  expect(touches).toBeGreaterThanOrEqual(3);
  expect(touches).toBeLessThanOrEqual(9);
  // Then nothing: it locks.
  await expect(page.getByTestId('lock-screen')).toBeVisible({ timeout: 6_000 });
});

test('a clerk leaving the desk locks the screen by hand; events that arrive meanwhile wait', async ({ page }) => {
  const app = await openApp(page, {
    ...inbox,
  }, { path: '#/referral' });
  await expect(page.getByTestId('nav-referral')).toHaveAttribute('aria-current', 'page');
  const before = app.callsTo('referral_list').length;

  await page.getByTestId('lock-screen-now').click();
  await expect(page.getByTestId('lock-screen')).toBeVisible();
  expect(app.callsTo('lock_session')).toEqual([{ reason: 'manual' }]);
  expect(app.state.audit.at(-1)).toMatchObject({ action: 'lock', fields: ['manual'] });

  // A letter arrives while locked: the inbox behind the lock does not read it now...
  await app.emit('document-changed', { id: 'r1', kind: 'referral' });
  await sleep(300);
  expect(app.callsTo('referral_list')).toHaveLength(before);

  // ...but as soon as the clerk is back.
  await page.locator('#password').fill('password123');
  await page.locator('#password').press('Enter');
  await expect(page.getByTestId('lock-screen')).toHaveCount(0);
  await expect.poll(() => app.callsTo('referral_list').length).toBe(before + 1);
});

test('another staff member signing in at the lock screen starts afresh, without the draft of the one before', async ({ page }) => {
  const app = await openApp(page, inbox, {
    path: '#/settings',
    staffList: [DEFAULT_STAFF, OTHER_STAFF],
    passwords: { yamada: 'password123', tanaka: 'tanaka-pass-1' },
  });
  await page.locator('#new-staff-name').fill('加藤 下書き');
  await page.getByTestId('lock-screen-now').click();
  await expect(page.getByTestId('lock-screen')).toBeVisible();

  await page.locator('#login').fill('tanaka');
  await page.locator('#password').fill('tanaka-pass-1');
  await page.locator('#password').press('Enter');

  // 田中 starts on the first screen, and nothing of 山田's work is there.
  await expect(page.getByTestId('lock-screen')).toHaveCount(0);
  await expect(page.getByTestId('staff-name')).toHaveText('田中 次郎 さん');
  await expect(page.getByTestId('nav-referral')).toHaveAttribute('aria-current', 'page');
  await expect(page.getByText('加藤 下書き')).toHaveCount(0);
  await page.getByTestId('nav-settings').click();
  await expect(page.getByRole('heading', { name: '設定', level: 1 })).toBeVisible();
  await expect(page.getByTestId('add-staff')).toHaveCount(0);
  await expect(page.getByText('加藤 下書き')).toHaveCount(0);

  // 山田's session ended: signed out, then 田中 signed in.
  expect(app.state.audit.filter((e) => e.action !== 'audit-read').map((e) => [e.action, e.staff])).toEqual([
    ['lock', 'yamada'],
    ['sign-out', 'yamada'],
    ['sign-in', 'tanaka'],
  ]);
});

test('a command after the idle time is refused by the engine itself, and the lock screen shows', async ({ page }) => {
  // The UI's own timer would lock after 10 minutes; the engine counts from the last command.
  const app = await openApp(page, inbox, { path: '#/referral' });
  await expect(page.getByTestId('nav-referral')).toHaveAttribute('aria-current', 'page');
  app.state.last_active_ms = Date.now() - 11 * 60_000;

  await page.getByTestId('nav-settings').click();
  await expect(page.getByTestId('lock-screen')).toBeVisible();
  await expect(page.getByTestId('locked-staff')).toHaveText('山田 花子 さんの画面はロックされています');
  expect(app.callsTo('lock_session')).toHaveLength(0);
  expect(app.state.audit.at(-1)).toMatchObject({ action: 'lock', staff: 'yamada', fields: ['idle'] });

  // Signed in again, the settings screen loads (the refused reads are made again).
  await page.locator('#password').fill('password123');
  await page.locator('#password').press('Enter');
  await expect(page.getByRole('heading', { name: '設定', level: 1 })).toBeVisible();
  await expect(page.getByTestId('staff-list')).toContainText('山田 花子');
});

test('the lock screen speaks English too', async ({ page }) => {
  await openApp(page, inbox, { path: '#/referral', lang: 'en' });
  await page.getByTestId('lock-screen-now').click();
  await expect(page.getByRole('heading', { name: 'Screen locked' })).toBeVisible();
  await expect(page.getByTestId('locked-staff')).toHaveText('The screen of 山田 花子 is locked');
  await expect(page.getByTestId('sign-in-card-mode')).toHaveText('Sign in with staff card');
});
