import { test, expect } from '@playwright/test';
import { AUTHORITY_FINGERPRINT, fail, openApp, type MockInvite } from './support/mock';

const DAY_MS = 24 * 3600_000;

/** An invite for a new facility, as the municipality's operator hands it over. */
function newFacility(over: Partial<MockInvite> = {}): MockInvite {
  return {
    kind: 'new_facility',
    facility_name: '七尾市立診療所',
    role: 'clinic',
    authority_fingerprint: AUTHORITY_FINGERPRINT,
    expires_at_ms: Date.now() + 7 * DAY_MS,
    ...over,
  };
}

/** An invite for one more computer of 小丸山小学校 避難所, made on its first laptop. */
function laptop(over: Partial<MockInvite> = {}): MockInvite {
  return {
    kind: 'device',
    facility_name: '七尾市立小丸山小学校 避難所',
    role: null,
    authority_fingerprint: AUTHORITY_FINGERPRINT,
    expires_at_ms: Date.now() + DAY_MS,
    ...over,
  };
}

const CLINIC_CODE = 'musubi2oWZhY2lsaXR5LWNsaW5pYy1uYW5hbw';
const LAPTOP_CODE = 'musubi2oWRldmljZS1zaGVsdGVyLWtvbWFydXlhbWE';

test('a clinic’s first computer reads the invite, compares the authority fingerprint, and joins', async ({ page }) => {
  const app = await openApp(page, {}, { phase: 'not_joined', invites: { [CLINIC_CODE]: newFacility() } });

  await page.locator('#invite').fill(CLINIC_CODE);

  // Before anything is sent: what the code enrols and whom it trusts.
  const preview = page.getByTestId('invite-preview');
  await expect(page.getByTestId('invite-kind')).toHaveText('新しい施設の登録');
  await expect(preview).toContainText('この端末を最初の端末として、新しい施設「七尾市立診療所」を連携ネットワークに登録します。');
  await expect(page.getByTestId('invite-facility')).toHaveText('七尾市立診療所');
  await expect(page.getByTestId('invite-role')).toHaveText('診療所・病院');
  await expect(page.getByTestId('authority-fingerprint').locator('.group')).toHaveText(AUTHORITY_FINGERPRINT.split(' '));
  await expect(page.getByTestId('authority-compare')).toHaveText(
    '自治体が公表している認証局の指紋と照合してください。一致しない場合は参加せず、自治体の担当者に連絡してください。',
  );
  expect(app.callsTo('join')).toHaveLength(0);
  await page.setViewportSize({ width: 1280, height: 1250 });
  await page.screenshot({ path: 'test-results/screenshots/join-preview.png' });

  await page.getByTestId('join').click();
  await expect(page.getByRole('heading', { name: '最初の職員アカウントを作成' })).toBeVisible();
  expect(app.callsTo('join')).toEqual([{ invite: CLINIC_CODE }]);
});

test('a second reception laptop waits for approval and joins when the first laptop has synced', async ({ page }) => {
  const invite = laptop({ pending: 2 });
  const app = await openApp(page, {}, { phase: 'not_joined', invites: { [LAPTOP_CODE]: invite } });

  await page.locator('#invite').fill(LAPTOP_CODE);
  await expect(page.getByTestId('invite-kind')).toHaveText('この施設の端末の追加');
  await expect(page.getByTestId('invite-preview')).toContainText('この端末を、施設「七尾市立小丸山小学校 避難所」の端末として追加します。');
  await expect(page.getByTestId('invite-role')).toHaveCount(0);
  await page.getByTestId('join').click();

  // The request waits for the inviting laptop: the clerk is told who approves and when.
  const pending = page.getByTestId('join-pending');
  await expect(pending.getByRole('heading', { name: '承認待ち' })).toBeVisible();
  await expect(page.getByTestId('join-pending-who')).toHaveText(
    '参加を申請しました。招待した端末が次に同期したときに承認されます。招待した端末が起動していて、ネットワークにつながっていることを確かめてください。',
  );
  await expect(page.getByTestId('join-checking')).toContainText('数秒ごとに自動で確認しています');
  await expect(page.locator('#invite')).toHaveAttribute('readonly', '');
  await expect(page.getByTestId('join')).toHaveCount(0);
  await page.setViewportSize({ width: 1280, height: 1400 });
  await page.screenshot({ path: 'test-results/screenshots/join-pending.png' });

  // The app asks again by itself; the first laptop syncs and approves; the join completes.
  await expect(page.getByRole('heading', { name: '最初の職員アカウントを作成' })).toBeVisible({ timeout: 15_000 });
  expect(app.callsTo('join')).toEqual([{ invite: LAPTOP_CODE }, { invite: LAPTOP_CODE }, { invite: LAPTOP_CODE }]);
  await expect(page.getByText('施設: 七尾市立小丸山小学校 避難所')).toBeVisible();
});

test('waiting can be stopped, and joining again with the same code finishes it', async ({ page }) => {
  const invite = laptop({ pending: 1000 });
  const app = await openApp(page, {}, { phase: 'not_joined', invites: { [LAPTOP_CODE]: invite } });

  await page.locator('#invite').fill(LAPTOP_CODE);
  await page.getByTestId('join').click();
  await expect(page.getByTestId('join-pending')).toBeVisible();

  await page.getByTestId('join-cancel').click();
  await expect(page.getByTestId('join-pending')).toHaveCount(0);
  await expect(page.getByTestId('join-cancelled')).toHaveText(
    '承認の確認をやめました。承認されたあとで、同じ招待コードでもう一度「参加する」を押すと参加できます。',
  );
  await expect(page.locator('#invite')).not.toHaveAttribute('readonly', '');
  // No more asking once stopped.
  const asked = app.callsTo('join').length;
  await page.waitForTimeout(4_000);
  expect(app.callsTo('join')).toHaveLength(asked);

  // Approved meanwhile: the same code finishes the join.
  invite.pending = 0;
  await page.getByTestId('join').click();
  await expect(page.getByRole('heading', { name: '最初の職員アカウントを作成' })).toBeVisible();
});

test('a waiting join whose invite is taken meanwhile stops and says why; a lost connection does not stop it', async ({ page }) => {
  let calls = 0;
  await openApp(
    page,
    {
      join: () => {
        calls++;
        if (calls === 1) return { status: { phase: 'not_joined', facility_name: '受付2', facility_role: null, staff: null, data_dir: '/tmp' }, pending: { kind: 'device', expires_at_ms: Date.now() + DAY_MS } };
        if (calls === 2) fail('unreachable', 'could not reach the relay at /ip4/10.20.0.5/tcp/4433 within 20 s');
        fail('invite_refused', 'another device has already asked to join with this invite');
      },
    },
    { phase: 'not_joined', invites: { [LAPTOP_CODE]: laptop() } },
  );
  await page.locator('#invite').fill(LAPTOP_CODE);
  await page.getByTestId('join').click();
  await expect(page.getByTestId('join-pending')).toBeVisible();

  // The relay drops out for a moment: still waiting, and the clerk sees why nothing moves.
  await expect(page.getByTestId('join-pending')).toContainText(
    '中継サーバーに接続できません。接続が戻りしだい、確認を続けます。',
    { timeout: 10_000 },
  );

  // Then the relay answers that the invite is taken: waiting stops with the reason.
  const alert = page.getByRole('alert');
  await expect(alert).toContainText('この招待コードは受け付けられませんでした', { timeout: 10_000 });
  await expect(alert).toContainText('another device has already asked to join with this invite');
  await expect(page.getByTestId('join-pending')).toHaveCount(0);
  await expect(page.getByTestId('join')).toBeEnabled();
});

test('expired, used and mistyped codes get clear errors', async ({ page }) => {
  const EXPIRED = 'musubi2ZXhwaXJlZC1pbnZpdGUtY29kZQ';
  const USED = 'musubi2dXNlZC1pbnZpdGUtY29kZQ';
  const app = await openApp(page, {}, {
    phase: 'not_joined',
    invites: {
      [EXPIRED]: newFacility({ expires_at_ms: Date.now() - DAY_MS }),
      [USED]: newFacility({ refuse: { kind: 'invite_refused', message: 'this invite was already used' } }),
    },
  });
  const alert = page.getByRole('alert');

  // Expired: said as soon as it is pasted, and joining does not ask the relay.
  await page.locator('#invite').fill(EXPIRED);
  await expect(alert).toContainText('この招待コードは有効期限が切れています。');
  await expect(page.getByTestId('invite-preview')).toHaveCount(0);
  await page.getByTestId('join').click();
  await expect(alert).toContainText('新しい招待コードを依頼してください。');

  // Used: the relay refuses it, with its reason as detail.
  await page.locator('#invite').fill(USED);
  await expect(page.getByTestId('invite-kind')).toHaveText('新しい施設の登録');
  await page.getByTestId('join').click();
  await expect(alert).toContainText('この招待コードは受け付けられませんでした(すでに使われたか、中継サーバーにまだ登録されていません)。');
  await expect(alert).toContainText('this invite was already used');

  // Cut short, or an old-format code: not an invite.
  for (const code of ['musubi2dXNlZC1pbnZpd', 'musubi1qWx3ZmFjaWxpdHk']) {
    await page.locator('#invite').fill(code);
    await page.getByTestId('join').click();
    await expect(alert).toContainText('これは結びの招待コードではありません。');
  }
  expect(app.callsTo('join')).toEqual([{ invite: USED }]);
});

test('in English, a device invite and its waiting state say the same', async ({ page }) => {
  await openApp(page, {}, { phase: 'not_joined', lang: 'en', invites: { [LAPTOP_CODE]: laptop({ pending: 1000 }) } });
  await page.locator('#invite').fill(LAPTOP_CODE);
  await expect(page.getByTestId('invite-kind')).toHaveText('Adding a computer to this facility');
  await expect(page.getByRole('heading', { name: 'Certification authority fingerprint' })).toBeVisible();
  await page.getByTestId('join').click();
  await expect(page.getByRole('heading', { name: 'Waiting for approval' })).toBeVisible();
  await expect(page.getByTestId('join-pending-who')).toContainText('It is approved when the inviting computer next syncs.');
  await expect(page.getByTestId('join-cancel')).toHaveText('Stop waiting');
});
