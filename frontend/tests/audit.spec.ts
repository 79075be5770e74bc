import { test, expect, type Page } from '@playwright/test';
import { DEFAULT_FACILITY_ID, DEFAULT_STAFF, OTHER_STAFF, openApp, type MockApp } from './support/mock';
import type { AuditEntryView } from '../src/lib/bindings';

const DOC = '0194a3c2-7d1e-7c3a-9f00-00000000d0c1';
const DEVICE = '12D3KooWQm7zNfVhd3Lq5oZ6x2cYvM9t4kP8rW1sBaE3uJn5GhXy';

/** 2025-01-09 at `h`:`m` in Japan (the tests run in Asia/Tokyo). */
function at(day: number, h: number, m = 0): number {
  return Date.UTC(2025, 0, day, h - 9, m);
}

/** A morning at the clinic: sign-ins (one failed), a letter read and edited, an export, a lock. */
function morning(): Omit<AuditEntryView, 'seq'>[] {
  const e = (
    t: number,
    staff: string | null,
    action: AuditEntryView['action'],
    fields: string[] = [],
    doc: string | null = null,
  ): Omit<AuditEntryView, 'seq'> => ({
    at_ms: t,
    staff,
    staff_name: staff === 'yamada' ? '山田 花子' : staff === 'tanaka' ? '田中 次郎' : null,
    device: DEVICE,
    this_device: true,
    facility: DEFAULT_FACILITY_ID,
    facility_name: '七尾市立診療所',
    doc,
    action,
    fields,
  });
  return [
    e(at(8, 17, 30), 'tanaka', 'sign-out'),
    e(at(9, 8, 55), 'tanaka', 'sign-in-failed', ['password']),
    e(at(9, 8, 56), 'tanaka', 'sign-in', ['password']),
    e(at(9, 9, 2), 'tanaka', 'read', [], DOC),
    e(at(9, 9, 5), 'tanaka', 'edit', ['purpose', 'diagnosis'], DOC),
    e(at(9, 9, 9), 'tanaka', 'print', ['様式11.pdf'], DOC),
    e(at(9, 9, 30), 'tanaka', 'lock', ['idle']),
    e(at(9, 10, 0), 'yamada', 'sign-in', ['card']),
  ];
}

async function openAudit(page: Page, opts: Parameters<typeof openApp>[2] = {}): Promise<MockApp> {
  const app = await openApp(
    page,
    {},
    { path: '#/settings', staffList: [DEFAULT_STAFF, OTHER_STAFF], audit: morning(), ...opts },
  );
  await expect(page.getByTestId('audit-section')).toBeVisible();
  return app;
}

test('an administrator sees who did what, filters the log, and every look is itself recorded', async ({ page }) => {
  const app = await openAudit(page);
  const section = page.getByTestId('audit-section');
  await expect(section.getByRole('heading', { name: '監査ログ' })).toBeVisible();

  // The check runs first and passes; then the list, newest first, shows that check and itself.
  const verdict = page.getByTestId('audit-verdict');
  await expect(verdict).toHaveAttribute('data-state', 'intact');
  await expect(verdict).toHaveText('監査ログは改ざんされていません(全 8 件を検証しました)。');
  const rows = page.getByTestId('audit-row');
  await expect(rows).toHaveCount(10);
  await expect(page.getByTestId('audit-count')).toHaveText('10 件');
  await expect(rows.nth(0).getByTestId('audit-action')).toHaveText('監査ログ閲覧');
  await expect(rows.nth(0).getByTestId('audit-fields')).toHaveText('一覧');
  await expect(rows.nth(1).getByTestId('audit-fields')).toHaveText('検証');
  await expect(rows.nth(2).getByTestId('audit-action')).toHaveText('サインイン');
  await expect(rows.nth(2).getByTestId('audit-staff')).toHaveText('山田 花子 (yamada)');
  await expect(rows.nth(2).getByTestId('audit-fields')).toHaveText('職員カード');
  await expect(rows.nth(3).getByTestId('audit-action')).toHaveText('ロック');
  await expect(rows.nth(3).getByTestId('audit-fields')).toHaveText('無操作');
  await expect(rows.nth(5).getByTestId('audit-action')).toHaveText('更新');
  await expect(rows.nth(5).getByTestId('audit-fields')).toHaveText('purpose, diagnosis');
  await expect(rows.nth(5)).toContainText(DOC.slice(0, 8));
  await expect(rows.nth(5)).toContainText('2025年1月9日 09:05');
  await expect(rows.nth(8).getByTestId('audit-action')).toHaveText('サインイン失敗');

  // Only the failed sign-ins.
  await page.locator('#audit-action').selectOption({ label: 'サインイン失敗' });
  await page.getByTestId('audit-apply').click();
  await expect(rows).toHaveCount(1);
  await expect(rows.first().getByTestId('audit-staff')).toHaveText('田中 次郎 (tanaka)');
  await expect(page.getByTestId('audit-count')).toHaveText('1 件');

  // One staff member, one day.
  await page.locator('#audit-action').selectOption('');
  await page.locator('#audit-staff').fill('tanaka');
  await page.locator('#audit-from').fill('2025-01-09');
  await page.locator('#audit-to').fill('2025-01-09');
  await page.getByTestId('audit-apply').click();
  await expect(rows).toHaveCount(6);
  await expect(rows.getByTestId('audit-action')).toHaveText(['ロック', '印刷', '更新', '閲覧', 'サインイン', 'サインイン失敗']);

  // One document, by clicking its id.
  await page.getByTestId('audit-reset').click();
  await expect(rows).toHaveCount(13);
  await rows.nth(7).getByRole('button', { name: DOC.slice(0, 8) }).click();
  await expect(page.locator('#audit-doc')).toHaveValue(DOC);
  await expect(rows).toHaveCount(3);
  await expect(rows.getByTestId('audit-action')).toHaveText(['印刷', '更新', '閲覧']);

  // A period that ends before it starts is pointed out before asking the engine.
  const lists = app.callsTo('audit_list').length;
  await page.locator('#audit-from').fill('2025-01-10');
  await page.locator('#audit-to').fill('2025-01-09');
  await page.getByTestId('audit-apply').click();
  await expect(page.getByTestId('validation')).toHaveText('期間の終了日は開始日以降にしてください。');
  expect(app.callsTo('audit_list')).toHaveLength(lists);

  // Each look at the log is in the log (as the engine records it: list, verify).
  const reads = app.state.audit.filter((e) => e.action === 'audit-read');
  expect(reads.map((e) => e.fields[0])).toEqual(['verify', 'list', 'list', 'list', 'list', 'list']);
  expect(reads.every((e) => e.staff === 'yamada')).toBe(true);
  expect(app.callsTo('audit_list')[2]).toEqual({
    query: { staff: 'tanaka', doc: null, action: null, since_ms: at(9, 0), until_ms: at(10, 0) },
  });
});

test('a periodic review records who reviewed which period, and is listed with the past ones', async ({ page }) => {
  const app = await openAudit(page);
  await expect(page.getByTestId('review-none')).toHaveText('まだ定期確認の記録はありません。');

  // A period that ends before it starts is refused before asking the engine.
  await page.locator('#review-from').fill('2025-01-10');
  await page.locator('#review-to').fill('2025-01-08');
  await page.getByTestId('audit-review').click();
  await expect(page.getByTestId('review-validation')).toHaveText(
    '確認した期間の開始日と終了日を入力してください(終了日は開始日以降)。',
  );
  expect(app.callsTo('audit_review')).toHaveLength(0);

  await page.locator('#review-from').fill('2025-01-08');
  await page.locator('#review-to').fill('2025-01-09');
  await page.getByTestId('audit-review').click();
  await expect(page.getByTestId('review-done')).toHaveText('2025-01-08〜2025-01-09 の定期確認を記録しました(8 件)。');
  expect(app.callsTo('audit_review')).toEqual([{ sinceMs: at(8, 0), untilMs: at(10, 0) }]);

  // The review is in the log, naming the period in Japan's days, the count and the check.
  const review = app.state.audit.find((e) => e.action === 'review');
  expect(review?.staff).toBe('yamada');
  expect(review?.fields).toEqual(['period:2025-01-08/2025-01-09', 'entries:8', 'chain:intact']);

  // And listed: who, which period, when.
  const past = page.getByTestId('review-row');
  await expect(past).toHaveCount(1);
  await expect(past.first()).toContainText('山田 花子 (yamada)');
  await expect(past.first().getByTestId('review-period')).toHaveText('2025-01-08〜2025-01-09');
  await expect(past.first()).toContainText('改ざんなし');
  await expect(page.getByTestId('audit-row').first().getByTestId('audit-action')).toHaveText('監査ログ閲覧');
  await expect(page.getByTestId('audit-row').nth(1).getByTestId('audit-action')).toHaveText('定期確認');

  // Opening the screen again suggests the next period: from the day after the last review.
  await page.reload();
  await expect(page.getByTestId('review-row')).toHaveCount(1);
  await expect(page.locator('#review-from')).toHaveValue('2025-01-10');
});

test('a log altered or cut on disk is shown in red, naming the entry, in Japanese and English', async ({ page }) => {
  const app = await openAudit(page);
  // Someone edited the log on disk: the engine's next check finds the break.
  app.state.audit_broken = { seq: 5, reason: 'entry 5 is missing (the next stored is 6)' };
  await page.getByTestId('audit-verify').click();

  const verdict = page.getByTestId('audit-verdict');
  await expect(verdict).toHaveAttribute('data-state', 'broken');
  await expect(verdict).toHaveAttribute('role', 'alert');
  await expect(verdict).toContainText('監査ログが改ざんまたは削除されています(第5件)。');
  await expect(verdict).toContainText('システム担当者と自治体の担当者に連絡してください');
  await expect(verdict).toContainText('entry 5 is missing (the next stored is 6)');
  await expect(verdict).toHaveCSS('color', 'rgb(179, 38, 30)');
  await expect(verdict).toHaveCSS('border-left-color', 'rgb(179, 38, 30)');

  // A review made now records the broken chain, and the list says so.
  await page.locator('#review-from').fill('2025-01-09');
  await page.locator('#review-to').fill('2025-01-09');
  await page.getByTestId('audit-review').click();
  await expect(page.getByTestId('review-done')).toBeVisible();
  expect(app.state.audit.find((e) => e.action === 'review')?.fields.slice(2)).toEqual([
    'chain:broken',
    `break:${DEVICE}#5`,
  ]);
  await expect(page.getByTestId('review-row').first()).toContainText('改ざん・欠落あり');

  await page.getByTestId('language').selectOption('en');
  await expect(verdict).toContainText('The audit log has been altered or entries removed (entry 5).');
  await expect(page.getByTestId('audit-row').first().getByTestId('audit-action')).toHaveText('Audit log read');
  await page.getByTestId('language').selectOption('ja');
});

test('a staff member who is not an administrator sees no audit log, and the engine refuses them', async ({ page }) => {
  const app = await openApp(
    page,
    {},
    { path: '#/settings', staff: OTHER_STAFF, staffList: [DEFAULT_STAFF, OTHER_STAFF], passwords: { tanaka: 'tanaka-pass-1' }, audit: morning() },
  );
  await expect(page.getByRole('heading', { name: '設定', level: 1 })).toBeVisible();
  await expect(page.getByTestId('staff-list')).toContainText('田中 次郎');
  await expect(page.getByTestId('staff-role').nth(0)).toHaveText('管理者');
  await expect(page.getByTestId('staff-role').nth(1)).toHaveText('職員');
  await expect(page.getByTestId('audit-section')).toHaveCount(0);
  // Nor may they add staff accounts or change the automatic lock.
  await expect(page.getByTestId('add-staff')).toHaveCount(0);
  await expect(page.getByTestId('idle-lock-current')).toHaveText('操作がないまま 10分 で画面をロックします。');
  await expect(page.getByTestId('idle-lock-save')).toHaveCount(0);
  expect(app.callsTo('audit_list')).toHaveLength(0);

  // Asked directly, the engine says no, and nothing about the log is recorded.
  const answer = await page.evaluate(() =>
    (window as any).__TAURI_INTERNALS__.invoke('audit_list', { query: {} }).then(
      () => 'answered',
      (e: { kind: string }) => e.kind,
    ),
  );
  expect(answer).toBe('admin_only');
  expect(app.state.audit.filter((e) => e.action === 'audit-read')).toHaveLength(0);
});

test('an administrator adds a second administrator and sets the automatic lock', async ({ page }) => {
  const app = await openApp(page, {}, { path: '#/settings' });
  await page.locator('#new-staff-login').fill('suzuki');
  await page.locator('#new-staff-name').fill('鈴木 三郎');
  await page.locator('#new-staff-password').fill('suzuki-pass-1');
  await page.locator('#new-staff-role').selectOption({ label: '管理者' });
  await page.getByTestId('add-staff').click();
  await expect(page.getByTestId('staff-added')).toBeVisible();
  await expect(page.getByTestId('staff-role').nth(1)).toHaveText('管理者');
  expect(app.state.audit.at(-1)?.fields).toEqual(['login=suzuki', 'role=admin']);

  await expect(page.getByTestId('idle-lock-current')).toHaveText('操作がないまま 10分 で画面をロックします。');
  await page.locator('#idle-lock-minutes').selectOption({ label: '5分' });
  await page.getByTestId('idle-lock-save').click();
  await expect(page.getByTestId('idle-lock-saved')).toBeVisible();
  await expect(page.getByTestId('idle-lock-current')).toHaveText('操作がないまま 5分 で画面をロックします。');
  expect(app.callsTo('set_idle_lock')).toEqual([{ minutes: 5 }]);
  expect(app.state.audit.at(-1)).toMatchObject({ action: 'staff-change', staff: 'yamada', fields: ['idle-lock:5min'] });
  expect(app.state.idle_lock.idle_ms).toBe(300_000);
});

test('a computer whose automatic lock is fixed by its system administrator shows it without a choice', async ({ page }) => {
  await openApp(page, {}, { path: '#/settings', idleLockMs: 90_000, idleLockFixed: true });
  await expect(page.getByTestId('idle-lock-current')).toHaveText('操作がないまま 90秒 で画面をロックします。');
  await expect(page.getByTestId('idle-lock-fixed')).toBeVisible();
  await expect(page.locator('#idle-lock-minutes')).toHaveCount(0);
});

test('the facility’s second computer: its entries come through the audit document, and a break in its copy is named', async ({ page }) => {
  const laptop = '12D3KooWLaptop2ReceptionNanaoClinic00000000000000000';
  const app = await openApp(page, {}, {
    path: '#/settings',
    staffList: [DEFAULT_STAFF, OTHER_STAFF],
    audit: [
      ...morning(),
      {
        at_ms: at(9, 11, 0),
        staff: 'tanaka',
        staff_name: '田中 次郎',
        device: laptop,
        this_device: false,
        facility: DEFAULT_FACILITY_ID,
        facility_name: '七尾市立診療所',
        doc: DOC,
        action: 'export',
        fields: ['fhir.json'],
      },
    ],
  });
  app.state.audit_chains = [
    {
      device: laptop,
      this_device: false,
      facility: DEFAULT_FACILITY_ID,
      facility_name: '七尾市立診療所',
      entries: 0,
      first: null,
      last: null,
      broken: { seq: 1, reason: 'two different entries are filed at this place' },
    },
  ];
  await page.getByTestId('audit-verify').click();
  const verdict = page.getByTestId('audit-verdict');
  await expect(verdict).toHaveAttribute('data-state', 'broken');
  const brk = page.getByTestId('audit-break');
  await expect(brk).toHaveCount(1);
  await expect(brk).toHaveAttribute('data-device', laptop);
  await expect(brk).toContainText('監査ログが改ざんまたは削除されています(第1件)。');
  await expect(brk).toContainText('七尾市立診療所 の端末 …00000000');
  await expect(brk).toContainText('two different entries are filed at this place');

  // Its entries are listed with the computer that wrote them.
  const row = page.getByTestId('audit-row').filter({ hasText: '書き出し' });
  await expect(row.getByTestId('audit-device')).toHaveText('七尾市立診療所 の端末 …00000000');
  await expect(page.getByTestId('audit-row').filter({ hasText: '更新' }).getByTestId('audit-device')).toHaveText('この端末');
});
