import { test, expect } from '@playwright/test';
import { AUTHORITY_FINGERPRINT, DEFAULT_FACILITY_ID, openApp, safetyNumberOf } from './support/mock';

const HOSPITAL_ID = '0194a3c2-7d1e-7c3a-9f00-0000000000c2';
const HOSPITAL_NEW = '31415 92653 58979 32384 62643 38327';
const HOSPITAL_OLD = '27182 81828 45904 52353 60287 47135';

test('settings list every facility with its safety number, role and computers, and the authority fingerprint', async ({ page }) => {
  await openApp(page, {}, { path: '#/settings' });
  const trust = page.getByTestId('trust');
  await expect(trust.getByRole('heading', { name: '連携先の施設と安全番号' })).toBeVisible();
  await expect(page.getByTestId('settings-authority-fingerprint').locator('.group')).toHaveText(AUTHORITY_FINGERPRINT.split(' '));
  await expect(trust).toContainText('自治体が公表している認証局の指紋と照合してください。');

  const rows = page.getByTestId('facility-row');
  await expect(rows).toHaveCount(5);
  // This facility first, marked, with its own safety number to read out to others.
  const self = rows.nth(0);
  await expect(self).toHaveAttribute('data-facility', DEFAULT_FACILITY_ID);
  await expect(self).toContainText('七尾市立診療所');
  await expect(self).toContainText('この施設');
  await expect(self.getByTestId('facility-devices')).toHaveText('2 台');
  await expect(self.getByTestId('safety-number')).toHaveText(safetyNumberOf(DEFAULT_FACILITY_ID));
  await expect(self.getByTestId('safety-number').locator('.group')).toHaveCount(6);
  // The others by name, each with its role and state.
  const hospital = page.locator(`[data-testid=facility-row][data-facility="${HOSPITAL_ID}"]`);
  await expect(hospital).toContainText('恵寿総合病院');
  await expect(hospital).toContainText('診療所・病院');
  await expect(hospital.getByTestId('facility-state')).toHaveText('確認済み');
  await expect(page.getByTestId('root-changed')).toHaveCount(0);
  await expect(page.getByTestId('ignored')).toHaveCount(0);
});

test('a hospital whose root key changed gets no keys until the safety number heard by phone is confirmed; a wrong one is refused', async ({ page }) => {
  const app = await openApp(page, {}, { path: '#/settings' });
  // The hospital replaced its computer; this device saw the old root key first.
  const hospital = app.state.trust.facilities.find((f) => f.id === HOSPITAL_ID)!;
  Object.assign(hospital, { trust: 'root_changed', safety_number: null, pinned_safety_number: HOSPITAL_OLD });
  app.state.new_safety_numbers[HOSPITAL_ID] = HOSPITAL_NEW;
  await page.reload();

  const warning = page.getByTestId('root-changed');
  await expect(warning.getByRole('heading', { name: '恵寿総合病院: ルート鍵が変更されました' })).toBeVisible();
  await expect(warning).toContainText('安全番号を確認するまで、この施設の端末には文書の鍵を渡しません');
  await expect(page.getByTestId('pinned-safety-number')).toHaveText(HOSPITAL_OLD);
  // The new number is not shown: it must be heard from the hospital.
  const row = page.locator(`[data-testid=facility-row][data-facility="${HOSPITAL_ID}"]`);
  await expect(row.getByTestId('facility-state')).toHaveText('ルート鍵が変更されました');
  await expect(row.getByTestId('safety-number')).toHaveCount(0);
  await expect(row).toContainText('確認が必要です');
  await expect(page.getByText(HOSPITAL_NEW)).toHaveCount(0);

  await page.getByTestId('start-confirm-root').click();
  await expect(warning).toContainText('以前から知っている電話番号で電話をかけてください');
  const input = page.getByTestId('safety-number-input');
  await expect(input).toBeFocused();

  // Nothing typed: pointed out before asking the engine.
  await page.getByTestId('confirm-root').click();
  await expect(page.getByTestId('validation')).toHaveText('聞き取った安全番号を入力してください。');

  // Misheard: refused, and nothing changes.
  await input.fill('31415 92653 58979 32384 62643 38328');
  await page.getByTestId('confirm-root').click();
  const alert = warning.getByRole('alert');
  await expect(alert).toContainText('入力した安全番号が一致しません。相手の施設にもう一度読み上げてもらい、入力し直してください。');
  await expect(alert).toContainText('does not match facility 恵寿総合病院');
  await expect(row.getByTestId('facility-state')).toHaveText('ルート鍵が変更されました');
  await page.setViewportSize({ width: 1280, height: 3000 });
  await page.getByTestId('trust').screenshot({ path: 'test-results/screenshots/settings-root-changed.png' });
  await page.setViewportSize({ width: 1280, height: 800 });

  // Read out again and typed with a Japanese input method: full-width digits, no spaces.
  await input.fill('３１４１５９２６５３５８９７９３２３８４６２６４３３８３２７');
  await page.getByTestId('confirm-root').click();
  await expect(page.getByTestId('root-confirmed')).toHaveText(
    '恵寿総合病院 の新しい鍵を確認しました。この施設の端末に文書の鍵を渡します。',
  );
  await expect(page.getByTestId('root-changed')).toHaveCount(0);
  await expect(row.getByTestId('facility-state')).toHaveText('確認済み');
  await expect(row.getByTestId('safety-number')).toHaveText(HOSPITAL_NEW);
  expect(app.callsTo('confirm_root').map((a) => a.facility)).toEqual([HOSPITAL_ID, HOSPITAL_ID]);
  expect(app.callsTo('confirm_root')[1].safetyNumber).toBe('３１４１５９２６５３５８９７９３２３８４６２６４３３８３２７');
});

test('a facility the relay listed without a certificate is shown as ignored, and a forked chain as a warning', async ({ page }) => {
  const app = await openApp(page, {}, { path: '#/settings' });
  app.state.trust.ignored = [
    {
      id: '0194a3c2-7d1e-7c3a-9f00-0000000000f1',
      name: '七尾市立総合病院(偽)',
      reason: 'the authority’s signature does not verify',
    },
  ];
  const shelter = app.state.trust.facilities.find((f) => f.role === 'shelter')!;
  Object.assign(shelter, {
    trust: 'chain_forked',
    problem: 'the relay served a device chain of 2 links; 3 were seen before',
    refused: ['link 3: not signed by a current device'],
  });
  await page.reload();

  const ignored = page.getByTestId('ignored');
  await expect(ignored.getByRole('heading', { name: '証明書のない施設(無視しています)' })).toBeVisible();
  await expect(page.getByTestId('ignored-facility')).toContainText('七尾市立総合病院(偽)');
  await expect(page.getByTestId('ignored-facility')).toContainText('理由: the authority’s signature does not verify');
  // Not among the facilities.
  await expect(page.getByTestId('facility-row')).toHaveCount(5);
  await expect(page.getByTestId('facility-trust')).not.toContainText('七尾市立総合病院(偽)');

  const forked = page.getByTestId('chain-forked');
  await expect(forked.getByRole('heading', { name: '七尾市立小丸山小学校 避難所: 端末の記録が食い違っています' })).toBeVisible();
  await expect(forked).toContainText('the relay served a device chain of 2 links; 3 were seen before');
  const row = page.locator(`[data-testid=facility-row][data-facility="${shelter.id}"]`);
  await expect(row.getByTestId('facility-state')).toHaveText('端末の記録が食い違っています');
  await row.getByText('受け入れなかった端末の記録').click();
  await expect(row).toContainText('link 3: not signed by a current device');
});

test('in English the safety numbers section uses the same words', async ({ page }) => {
  await openApp(page, {}, { path: '#/settings', lang: 'en' });
  await expect(page.getByRole('heading', { name: 'Facilities and safety numbers' })).toBeVisible();
  await expect(page.getByRole('heading', { name: 'Certification authority fingerprint' })).toBeVisible();
  await expect(page.getByRole('heading', { name: 'This facility’s computers' })).toBeVisible();
  await expect(page.getByTestId('facility-row').nth(0)).toContainText('This facility');
  await expect(page.getByTestId('facility-row').nth(1).getByTestId('facility-state')).toHaveText('Verified');
});
