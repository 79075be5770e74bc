// 紹介状 (診療情報提供書, 様式11): user stories against the built UI, the engine mocked at the IPC
// boundary. A small fake of the referral commands keeps the letters so each story sees its own
// actions come back, the way the real engine would answer them.
import { existsSync, readFileSync } from 'node:fs';
import { test, expect, type Page } from '@playwright/test';
import { openApp, fail, deferred, DEFAULT_FACILITY_ID, type Handlers, type MockApp } from './support/mock';
import type {
  FacilityChoice,
  LetterDetail,
  LetterSummary,
  ReferralLetter,
  ReferralStatus,
  StatusTimes,
} from '../src/lib/bindings';

// ---- the deployment ----

const SELF = '七尾市立診療所';
const KEIJU = { id: '0194a3c2-7d1e-7c3a-9f00-0000000000c2', name: '恵寿総合病院' };
const MINATO = { id: '0194a3c2-7d1e-7c3a-9f00-0000000000c6', name: '港診療所' };
const FACILITIES: FacilityChoice[] = [
  { id: DEFAULT_FACILITY_ID, name: SELF, role: 'clinic', is_self: true },
  { id: KEIJU.id, name: KEIJU.name, role: 'clinic', is_self: false },
  { id: MINATO.id, name: MINATO.name, role: 'clinic', is_self: false },
  { id: '0194a3c2-7d1e-7c3a-9f00-0000000000c3', name: '七尾市居宅介護支援事業所', role: 'care-office', is_self: false },
  { id: '0194a3c2-7d1e-7c3a-9f00-0000000000c5', name: '七尾市災害対策本部', role: 'hq', is_self: false },
];

/**
 * The JP eReferral example Bundle (HL7 Japan / JAMI, CC BY-ND 4.0; see ../shared/data/fhir-ereferral/
 * SOURCES.md), read unmodified from the shared real data beside the repository.
 */
const FHIR_EXAMPLE_URL = new URL('../../../shared/data/fhir-ereferral/Bundle-BundleReferralExample01.json', import.meta.url);
function fhirExample(): string {
  if (!existsSync(FHIR_EXAMPLE_URL)) {
    throw new Error(`the real data file ${FHIR_EXAMPLE_URL.pathname} is missing; the tests need ../shared/data beside the repository`);
  }
  return readFileSync(FHIR_EXAMPLE_URL, 'utf-8');
}

// ---- a fake of the engine's referral commands ----

const FIELDS = [
  'to_facility', 'to_doctor', 'from_facility', 'from_doctor', 'diagnosis', 'purpose', 'history',
  'progress', 'treatment', 'prescription', 'remarks', 'reply',
] as const;

function blankLetter(): ReferralLetter {
  return {
    to_facility: '', to_doctor: '', from_facility: '', from_doctor: '',
    patient: { name: '', kana: '', sex: '', birth_date: '', address: '', phone: '', occupation: '' },
    diagnosis: '', purpose: '', history: '', progress: '', treatment: '', prescription: '', remarks: '',
    status: 'draft', reply: '', attachments: [],
  };
}

const noTimes = (): StatusTimes => ({ created_at: null, sent_at: null, received_at: null, replied_at: null });

/** The 様式11 content of the FHIR example (the test persona 田中 太郎), as a letter from 港診療所. */
function tanakaFromMinato(status: ReferralStatus = 'received'): LetterDetail {
  const letter: ReferralLetter = {
    ...blankLetter(),
    to_facility: SELF,
    to_doctor: '野口 英世丸',
    from_facility: MINATO.name,
    from_doctor: '大河内 勘三郎',
    patient: {
      name: '田中 太郎', kana: 'タナカ タロウ', sex: '男', birth_date: '1955-05-04',
      address: '〒123-4567 神奈川県横浜市港区１－２－３', phone: '03-1234-5678', occupation: '',
    },
    diagnosis: '上腹部痛、腰痛',
    purpose: '腹痛精査お願いします。',
    history: '2018年　狭心症　２ヶ月治療で軽快。2019年　交通事故で左前腕骨折　３ヶ月ギプス固定。\n家族歴：母　胃がん',
    progress: '２０２２年６月上旬から夜食後に時々上腹部痛があり、だんだんひどくなっている。他に目立った症状なし。',
    remarks: 'アレルギー：サバ　キーウイ',
    status,
  };
  return {
    id: 'letter-tanaka',
    direction: 'inbox',
    letter,
    times: { created_at: '2025-01-09T00:30:00Z', sent_at: '2025-01-09T00:31:00Z', received_at: '2025-01-09T01:00:00Z', replied_at: null },
    counterpart: MINATO.name,
    counterpart_id: MINATO.id,
    editable: false,
    can_send: false,
    can_reply: true,
    unreadable_bundles: 0,
  };
}

/** A letter this clinic sent to 恵寿総合病院 (an invented patient). */
function notoToKeiju(): LetterDetail {
  return {
    id: 'letter-noto',
    direction: 'outbox',
    letter: {
      ...blankLetter(),
      to_facility: KEIJU.name, to_doctor: '循環器内科', from_facility: SELF, from_doctor: '山田 花子',
      patient: { ...blankLetter().patient, name: '能登 一郎', sex: '男', birth_date: '1948-11-02' },
      diagnosis: '労作性狭心症の疑い', purpose: '冠動脈精査のお願い', status: 'sent',
    },
    times: { created_at: '2025-01-08T02:00:00Z', sent_at: '2025-01-08T02:10:00Z', received_at: null, replied_at: null },
    counterpart: KEIJU.name,
    counterpart_id: KEIJU.id,
    editable: false,
    can_send: false,
    can_reply: false,
    unreadable_bundles: 0,
  };
}

function summaryOf(d: LetterDetail): LetterSummary {
  return {
    id: d.id,
    direction: d.direction,
    patient_name: d.letter.patient.name,
    counterpart: d.counterpart,
    counterpart_id: d.counterpart_id,
    diagnosis: d.letter.diagnosis.split('\n')[0] ?? '',
    status: d.letter.status,
    times: d.times,
    attachments: d.letter.attachments.length,
  };
}

function setField(l: ReferralLetter, field: string, text: string) {
  if (field.startsWith('patient.')) (l.patient as Record<string, string>)[field.slice(8)] = text;
  else if ((FIELDS as readonly string[]).includes(field)) (l as unknown as Record<string, string>)[field] = text;
  else fail('invalid_input', `unknown field ${field}`);
}

class FakeReferrals {
  letters = new Map<string, LetterDetail>();
  #next = 1;

  constructor(...initial: LetterDetail[]) {
    for (const d of initial) this.letters.set(d.id, structuredClone(d));
  }

  add(d: LetterDetail) {
    this.letters.set(d.id, structuredClone(d));
  }

  get(id: string): LetterDetail {
    const d = this.letters.get(id);
    if (!d) fail('not_found', `no letter ${id}`);
    return d;
  }

  handlers(): Handlers {
    return {
      referral_list: () => [...this.letters.values()].reverse().map(summaryOf),
      referral_get: ({ id }) => structuredClone(this.get(id)),
      referral_create: ({ to }, app: MockApp) => {
        const f = app.state.facilities.find((x) => x.id === to);
        if (!f) fail('not_found', `unknown facility ${to}`);
        if (f.is_self) fail('invalid_input', 'a letter goes to another facility, not this one');
        const id = `letter-new-${this.#next++}`;
        this.add({
          id,
          direction: 'outbox',
          letter: { ...blankLetter(), to_facility: f.name, from_facility: app.state.facility_name ?? '', from_doctor: app.state.staff?.name ?? '' },
          times: { ...noTimes(), created_at: '2025-01-09T05:00:00Z' },
          counterpart: f.name,
          counterpart_id: f.id,
          editable: true,
          can_send: true,
          can_reply: false,
          unreadable_bundles: 0,
        });
        return id;
      },
      referral_edit: ({ id, field, text }) => {
        const d = this.get(id);
        if (d.direction === 'outbox' && !d.editable) fail('read_only', 'the letter was sent');
        setField(d.letter, field, text);
        return null;
      },
      referral_send: ({ id }) => {
        const d = this.get(id);
        if (!d.letter.patient.name.trim()) fail('invalid_input', '患者氏名 (the patient\'s name) is empty');
        d.letter.status = 'sent';
        d.times.sent_at = '2025-01-09T05:10:00Z';
        d.editable = false;
        d.can_send = false;
        return null;
      },
      referral_reply: ({ id, text }) => {
        const d = this.get(id);
        if (d.direction !== 'inbox') fail('invalid_input', 'the 返書 is written by the facility that received the letter');
        d.letter.reply = text;
        d.letter.status = 'replied';
        d.times.replied_at = '2025-01-09T06:00:00Z';
        return null;
      },
      referral_import_fhir: ({ to, json }, app: MockApp) => {
        const f = app.state.facilities.find((x) => x.id === to);
        if (!f) fail('not_found', `unknown facility ${to}`);
        let bundle: any;
        try {
          bundle = JSON.parse(json);
        } catch (e) {
          fail('invalid_input', `the FHIR Bundle is not JSON: ${e}`);
        }
        const composition = bundle.entry?.[0]?.resource;
        if (bundle.type !== 'document' || composition?.resourceType !== 'Composition') {
          fail('invalid_input', 'not a FHIR document Bundle: the first entry must be a Composition');
        }
        const patient = bundle.entry.find((e: any) => e.resource?.resourceType === 'Patient')?.resource;
        const id = `letter-import-${this.#next++}`;
        this.add({
          id,
          direction: 'outbox',
          letter: {
            ...blankLetter(),
            to_facility: f.name,
            from_facility: '港診療所',
            patient: { ...blankLetter().patient, name: patient?.name?.[0]?.text ?? '' },
            purpose: '腹痛精査お願いします。',
            status: 'sent',
          },
          times: { ...noTimes(), created_at: '2025-01-09T05:20:00Z', sent_at: '2025-01-09T05:20:00Z' },
          counterpart: f.name,
          counterpart_id: f.id,
          editable: false,
          can_send: false,
          can_reply: false,
          unreadable_bundles: 0,
        });
        return id;
      },
      referral_attach: ({ id, name, mediaType, dataBase64 }) => {
        const d = this.get(id);
        const bytes = Buffer.from(dataBase64, 'base64').length;
        if (bytes > 8 * 1024 * 1024) fail('invalid_input', 'the file is too large');
        const ref = { id: 'a'.repeat(63) + String(d.letter.attachments.length), name, media_type: mediaType, bytes, added_at: '2025-01-09T05:30:00Z' };
        d.letter.attachments.push(ref);
        return ref;
      },
      referral_save_attachment: () => null,
    };
  }
}

async function openReferrals(page: Page, fake: FakeReferrals, extra: Handlers = {}, opts: { lang?: 'ja' | 'en'; path?: string } = {}) {
  const app = await openApp(page, { ...fake.handlers(), ...extra }, { facilities: FACILITIES, path: opts.path ?? '#/referral', lang: opts.lang });
  return app;
}

const rows = (page: Page) => page.getByTestId('referral-row');

/** The last text sent for `field` of letter `id`. */
function lastEdit(app: MockApp, id: string, field: string): string | undefined {
  return app.callsTo('referral_edit').filter((a) => a.id === id && a.field === field).at(-1)?.text;
}

// ---- stories ----

test('a clinic clerk sees a letter arrive in the inbox while the screen is open', async ({ page }) => {
  const fake = new FakeReferrals();
  const app = await openReferrals(page, fake);

  await expect(page.getByTestId('referral-inbox')).toHaveAttribute('aria-selected', 'true');
  await expect(page.getByTestId('referral-empty')).toContainText('届いた紹介状はまだありません');

  // A care-plan change is not a reason to reload the letters.
  const before = app.callsTo('referral_list').length;
  await app.emit('document-changed', { id: 'plan-1', kind: 'care-plan' });

  // 港診療所's letter about 田中 太郎 syncs in.
  fake.add(tanakaFromMinato());
  await app.emit('document-changed', { id: 'letter-tanaka', kind: 'referral' });

  const row = rows(page).filter({ hasText: '田中 太郎' });
  await expect(row).toBeVisible();
  await expect(row).toContainText('港診療所');
  await expect(row).toContainText('受領済');
  await expect(row).toContainText('上腹部痛、腰痛');
  await expect(row).toContainText('2025年1月9日');
  await expect(row).toContainText('新着');
  await expect(page.getByTestId('referral-announce')).toHaveText('新しい紹介状が届きました：田中 太郎 さん（港診療所）');
  expect(app.callsTo('referral_list')).toHaveLength(before + 1);
});

test('a doctor writes a new letter to another clinic and sends it', async ({ page }) => {
  const fake = new FakeReferrals(notoToKeiju());
  const app = await openReferrals(page, fake);

  // Without a recipient the button says what to do.
  await page.getByTestId('referral-new').click();
  await expect(page.getByTestId('referral-recipient-problem')).toHaveText('紹介先の医療機関を選んでから、もう一度押してください。');
  await expect(page.locator('#referral-recipient')).toBeFocused();
  expect(app.callsTo('referral_create')).toHaveLength(0);

  await page.locator('#referral-recipient').selectOption({ label: '恵寿総合病院（診療所・病院）' });
  await page.getByTestId('referral-new').click();
  expect(app.callsTo('referral_create')).toEqual([{ to: KEIJU.id }]);

  // The draft opens prefilled with both facilities and the signed-in doctor.
  await expect(page.getByRole('heading', { level: 1 })).toContainText('診療情報提供書');
  await expect(page.getByLabel('紹介先医療機関名')).toHaveValue('恵寿総合病院');
  await expect(page.getByLabel('紹介元医療機関名')).toHaveValue(SELF);
  await expect(page.getByLabel('紹介元医師氏名')).toHaveValue('山田 花子');
  await expect(page.getByTestId('referral-status')).toHaveText('作成中');

  // Typing goes to the engine as it is typed, debounced: not one call per keystroke.
  const name = page.getByLabel('患者氏名');
  await name.pressSequentially('能登 花子', { delay: 40 });
  await expect(page.getByTestId('referral-save-state')).toHaveText('保存済');
  expect(lastEdit(app, 'letter-new-1', 'patient.name')).toBe('能登 花子');
  expect(app.callsTo('referral_edit').filter((a) => a.field === 'patient.name').length).toBeLessThanOrEqual(2);

  await page.getByLabel('担当医（診療科・氏名）').fill('循環器内科　ご担当先生');
  await page.getByLabel('性別').selectOption('女');
  await page.getByLabel('生年月日').fill('1950-03-15');
  await expect(page.locator('#referral-birth-hint')).toContainText('1950年3月15日（昭和25年）');
  await page.getByLabel('傷病名').fill('心房細動\n高血圧症');
  await page.getByLabel('紹介目的').fill('抗凝固療法の導入についてご高診をお願いします。');
  await page.getByLabel('現在の処方').fill('アムロジピン錠5mg　1錠　1日1回朝食後');
  await page.getByLabel('現在の処方').blur(); // leaving a field sends it at once

  await expect(page.getByTestId('referral-save-state')).toHaveText('保存済');
  expect(lastEdit(app, 'letter-new-1', 'to_doctor')).toBe('循環器内科　ご担当先生');
  expect(lastEdit(app, 'letter-new-1', 'patient.sex')).toBe('女');
  expect(lastEdit(app, 'letter-new-1', 'patient.birth_date')).toBe('1950-03-15');
  expect(lastEdit(app, 'letter-new-1', 'diagnosis')).toBe('心房細動\n高血圧症');
  expect(lastEdit(app, 'letter-new-1', 'purpose')).toBe('抗凝固療法の導入についてご高診をお願いします。');
  expect(lastEdit(app, 'letter-new-1', 'prescription')).toBe('アムロジピン錠5mg　1錠　1日1回朝食後');

  // 送付 asks first; cancelling sends nothing.
  await page.getByTestId('referral-send').click();
  const dialog = page.getByTestId('referral-send-dialog');
  await expect(dialog).toBeVisible();
  await expect(dialog).toContainText('能登 花子 さんの紹介状を 恵寿総合病院 へ送付します。');
  await dialog.getByRole('button', { name: 'キャンセル' }).click();
  await expect(dialog).toBeHidden();
  expect(app.callsTo('referral_send')).toHaveLength(0);

  await page.getByTestId('referral-send').click();
  await page.getByTestId('referral-send-dialog-confirm').click();
  await expect(page.getByTestId('referral-status')).toHaveText('送付済');
  expect(app.callsTo('referral_send')).toEqual([{ id: 'letter-new-1' }]);
  await expect(page.getByTestId('referral-letter-announce')).toHaveText('恵寿総合病院 へ送付しました。');

  // A sent letter is read-only and has no send button any more.
  await expect(page.getByTestId('referral-send')).toHaveCount(0);
  await expect(page.getByTestId('referral-readonly')).toContainText('送付済みの紹介状は変更できません');
  await expect(page.getByLabel('紹介目的')).toHaveAttribute('readonly', '');

  // Back in the outbox, the letter is listed as sent and has the focus.
  await page.getByTestId('referral-back').click();
  await expect(page.getByTestId('referral-outbox')).toHaveAttribute('aria-selected', 'true');
  const row = rows(page).filter({ hasText: '能登 花子' });
  await expect(row).toContainText('送付済');
  await expect(row).toContainText('恵寿総合病院');
  await expect(row.getByRole('link')).toBeFocused();
});

test('a letter cannot be sent without the patient name', async ({ page }) => {
  const fake = new FakeReferrals();
  const app = await openReferrals(page, fake);
  await page.locator('#referral-recipient').selectOption(KEIJU.id);
  await page.getByTestId('referral-new').click();
  await page.getByTestId('referral-send').click();
  await expect(page.getByTestId('referral-send-problem')).toHaveText('患者氏名が空です。患者氏名を入力してから送付してください。');
  await expect(page.getByLabel('患者氏名')).toBeFocused();
  await expect(page.getByTestId('referral-send-dialog')).toBeHidden();
  expect(app.callsTo('referral_send')).toHaveLength(0);
});

test('replying to a received letter', async ({ page }) => {
  const fake = new FakeReferrals(tanakaFromMinato(), notoToKeiju());
  const app = await openReferrals(page, fake);

  await rows(page).filter({ hasText: '田中 太郎' }).click();
  await expect(page.getByTestId('referral-direction')).toHaveText('港診療所 から届いた紹介状');
  await expect(page.getByTestId('referral-status')).toHaveText('受領済');

  // The letter is the sender's: shown as written, not editable.
  await expect(page.getByLabel('紹介目的')).toHaveValue('腹痛精査お願いします。');
  await expect(page.getByLabel('紹介目的')).toHaveAttribute('readonly', '');
  await expect(page.getByTestId('referral-readonly')).toContainText('港診療所 から届いた紹介状です。内容は変更できません。');
  await expect(page.getByTestId('referral-send')).toHaveCount(0);

  // An empty reply is not sent.
  await page.getByTestId('referral-reply').click();
  await expect(page.getByTestId('referral-reply-problem')).toHaveText('返書が空です。返書を入力してから送ってください。');
  expect(app.callsTo('referral_reply')).toHaveLength(0);

  const text = 'ご紹介ありがとうございました。上部消化管内視鏡検査にて胃潰瘍を認め、加療を開始しました。';
  await page.locator('#referral-reply-text').fill(text);
  await expect(page.getByTestId('referral-save-state')).toHaveText('保存済'); // the draft reply is kept by the engine
  await page.getByTestId('referral-reply').click();

  await expect(page.getByTestId('referral-status')).toHaveText('返書済');
  expect(app.callsTo('referral_reply')).toEqual([{ id: 'letter-tanaka', text }]);
  await expect(page.getByTestId('referral-reply')).toHaveText('返書を更新する');
  await expect(page.getByTestId('referral-reply-done')).toHaveText('港診療所 へ返書を送りました。');

  await page.getByTestId('referral-back').click();
  await expect(rows(page).filter({ hasText: '田中 太郎' })).toContainText('返書済');
});

test('the sender reads the reply when it comes back', async ({ page }) => {
  const sent = notoToKeiju();
  const fake = new FakeReferrals(sent);
  const app = await openReferrals(page, fake, {}, { path: '#/referral/letter-noto' });
  await expect(page.getByTestId('referral-status')).toHaveText('送付済');
  await expect(page.getByText('返書はまだ届いていません。')).toBeVisible();

  const d = fake.get('letter-noto');
  d.letter.status = 'replied';
  d.letter.reply = '冠動脈CTにて有意狭窄なし。外来で経過観察とします。';
  d.times.received_at = '2025-01-08T03:00:00Z';
  d.times.replied_at = '2025-01-09T02:00:00Z';
  await app.emit('document-changed', { id: 'letter-noto', kind: 'referral' });

  await expect(page.getByTestId('referral-status')).toHaveText('返書済');
  await expect(page.getByTestId('referral-reply-shown')).toHaveText('冠動脈CTにて有意狭窄なし。外来で経過観察とします。');
});

test('a bad FHIR file shows a Japanese sentence saying what to do', async ({ page }) => {
  const fake = new FakeReferrals();
  const app = await openReferrals(page, fake);
  await page.locator('#referral-recipient').selectOption(KEIJU.id);

  // Not JSON at all: said at once, nothing is sent to the engine.
  await page.getByTestId('referral-import').setInputFiles({ name: '紹介状.json', mimeType: 'application/json', buffer: Buffer.from('診療情報提供書\n田中 太郎') });
  await expect(page.getByTestId('referral-import-error')).toHaveText(
    '「紹介状.json」は FHIR の JSON ファイルではありません。電子カルテから「診療情報提供書（FHIR JSON）」として書き出したファイルを選んでください。',
  );

  // JSON, a Bundle, but not a document the engine can read: its sentence, with the detail below.
  const notADocument = JSON.stringify({ resourceType: 'Bundle', type: 'collection', entry: [] });
  await page.getByTestId('referral-import').setInputFiles({ name: 'collection.json', mimeType: 'application/json', buffer: Buffer.from(notADocument) });
  await expect(page.getByTestId('referral-import-error')).toBeHidden();
  await expect(page.getByTestId('referral-import-pending')).toContainText('「collection.json」を取り込み、恵寿総合病院 へ送付します。');
  await page.getByTestId('referral-import-confirm').click();
  await expect(page.getByTestId('referral-import-error')).toHaveText(
    '「collection.json」は診療情報提供書（JP eReferral）の FHIR 文書として読み取れませんでした。作成元に JP_Bundle_eReferral 形式で書き出し直してもらうか、「紹介状を書く」から手で作成してください。',
  );
  await page.getByText('詳細', { exact: true }).click();
  await expect(page.getByText('not a FHIR document Bundle: the first entry must be a Composition')).toBeVisible();
  expect(app.callsTo('referral_import_fhir')).toHaveLength(1);
  expect(app.unhandled).toEqual([]);
});

test('a clerk imports the eReferral FHIR file and it goes to the chosen hospital', async ({ page }) => {
  const FHIR_EXAMPLE = fhirExample();
  const fake = new FakeReferrals();
  const hold = deferred();
  const fakeImport = fake.handlers().referral_import_fhir;
  const app = await openReferrals(page, fake, {
    referral_import_fhir: async (args, a) => {
      await hold.promise;
      return fakeImport(args, a);
    },
  });

  // The file is picked first; the screen then asks for the recipient.
  await page.getByTestId('referral-import').setInputFiles({ name: 'Bundle-BundleReferralExample01.json', mimeType: 'application/json', buffer: Buffer.from(FHIR_EXAMPLE) });
  await expect(page.getByTestId('referral-import-pending')).toContainText('上で紹介先の医療機関を選んでから');
  await page.getByTestId('referral-import-confirm').click();
  await expect(page.getByTestId('referral-recipient-problem')).toBeVisible();
  expect(app.callsTo('referral_import_fhir')).toHaveLength(0);

  await page.locator('#referral-recipient').selectOption(KEIJU.id);
  await expect(page.getByTestId('referral-import-pending')).toContainText('恵寿総合病院 へ送付します');
  await page.getByTestId('referral-import-confirm').click();
  await expect(page.getByTestId('referral-import-progress')).toHaveText('FHIRファイルを取り込んでいます…');
  hold.resolve();

  await expect(page.getByTestId('referral-status')).toHaveText('送付済');
  await expect(page.getByLabel('患者氏名')).toHaveValue('田中 太郎');
  await expect(page.getByTestId('referral-letter-announce')).toHaveText('「Bundle-BundleReferralExample01.json」を取り込み、恵寿総合病院 へ送付しました。');
  const [call] = app.callsTo('referral_import_fhir');
  expect(call.to).toBe(KEIJU.id);
  expect(call.json).toBe(FHIR_EXAMPLE);
});

test('attaching files: the size limit is said in a sentence, a test result is attached and saved', async ({ page }) => {
  const fake = new FakeReferrals();
  const app = await openReferrals(page, fake, {
    'plugin:dialog|save': ({ options }) => `/home/clerk/Documents/${options.defaultPath}`,
  });
  await page.locator('#referral-recipient').selectOption(KEIJU.id);
  await page.getByTestId('referral-new').click();
  await expect(page.getByText('添付ファイルはありません。')).toBeVisible();

  const big = Buffer.alloc(9 * 1024 * 1024, 1);
  await page.getByTestId('referral-attach').setInputFiles({ name: 'CT-2025-01-08.dcm', mimeType: 'application/dicom', buffer: big });
  await expect(page.getByTestId('referral-attach-error')).toHaveText(
    '「CT-2025-01-08.dcm」は 9.0 MB あり、添付できる上限（8.0 MB）を超えています。8.0 MB 以下に縮小・分割してから添付してください。',
  );
  expect(app.callsTo('referral_attach')).toHaveLength(0);

  const pdf = Buffer.from('%PDF-1.4\n血液検査結果 2025-01-08\n%%EOF\n');
  await page.getByTestId('referral-attach').setInputFiles({ name: '血液検査-2025-01-08.pdf', mimeType: 'application/pdf', buffer: pdf });
  await expect(page.getByTestId('referral-attach-done')).toHaveText('「血液検査-2025-01-08.pdf」を添付しました。');
  await expect(page.getByTestId('referral-attach-error')).toBeHidden();
  const item = page.getByTestId('referral-attachment');
  await expect(item).toContainText('血液検査-2025-01-08.pdf');
  const [call] = app.callsTo('referral_attach');
  expect(call).toMatchObject({ id: 'letter-new-1', name: '血液検査-2025-01-08.pdf', mediaType: 'application/pdf' });
  expect(Buffer.from(call.dataBase64, 'base64').equals(pdf)).toBe(true);

  await item.getByRole('button', { name: '「血液検査-2025-01-08.pdf」を保存' }).click();
  await expect(page.getByText('/home/clerk/Documents/血液検査-2025-01-08.pdf に保存しました。')).toBeVisible();
  const attachment = fake.get('letter-new-1').letter.attachments[0].id;
  expect(app.callsTo('referral_save_attachment')).toEqual([
    { id: 'letter-new-1', attachment, path: '/home/clerk/Documents/血液検査-2025-01-08.pdf' },
  ]);
});

test('a failed edit says why, keeps the text and is sent again', async ({ page }) => {
  const fake = new FakeReferrals();
  let refuse = true;
  const edit = fake.handlers().referral_edit;
  const app = await openReferrals(page, fake, {
    referral_edit: (args, a) => (refuse ? fail('storage', 'disk I/O error') : edit(args, a)),
  });
  await page.locator('#referral-recipient').selectOption(KEIJU.id);
  await page.getByTestId('referral-new').click();

  await page.getByLabel('傷病名').fill('肺炎');
  await expect(page.getByTestId('referral-save-state')).toHaveText('未保存');
  await expect(page.getByTestId('referral-save-error')).toContainText('この端末のデータを読み書きできませんでした。');
  await expect(page.getByLabel('傷病名')).toHaveValue('肺炎');

  refuse = false;
  await page.getByTestId('referral-save-error').getByRole('button', { name: 'もう一度試す' }).click();
  await expect(page.getByTestId('referral-save-state')).toHaveText('保存済');
  await expect(page.getByTestId('referral-save-error')).toBeHidden();
  expect(lastEdit(app, 'letter-new-1', 'diagnosis')).toBe('肺炎');
});

test('a colleague\'s change shows up without losing what is being typed', async ({ page }) => {
  const draft: LetterDetail = {
    ...notoToKeiju(),
    id: 'letter-draft',
    letter: { ...notoToKeiju().letter, status: 'draft', history: '' },
    times: { ...noTimes(), created_at: '2025-01-09T00:00:00Z' },
    editable: true,
    can_send: true,
  };
  const fake = new FakeReferrals(draft);
  const hold = deferred();
  const edit = fake.handlers().referral_edit;
  const app = await openReferrals(page, fake, {
    referral_edit: async (args, a) => {
      await hold.promise;
      return edit(args, a);
    },
  }, { path: '#/referral/letter-draft' });

  await page.getByLabel('症状経過及び検査結果').fill('坂道で胸部圧迫感');
  // Another device of this clinic edits 既往歴 meanwhile; the typed text is still on its way.
  fake.get('letter-draft').letter.history = '高血圧症（2015年〜）';
  fake.get('letter-draft').letter.progress = '（古い文）';
  await app.emit('document-changed', { id: 'letter-draft', kind: 'referral' });

  await expect(page.getByLabel('既往歴及び家族歴')).toHaveValue('高血圧症（2015年〜）');
  await expect(page.getByLabel('症状経過及び検査結果')).toHaveValue('坂道で胸部圧迫感');
  hold.resolve();
  await expect(page.getByTestId('referral-save-state')).toHaveText('保存済');
  expect(lastEdit(app, 'letter-draft', 'progress')).toBe('坂道で胸部圧迫感');
});

test('everything works from the keyboard', async ({ page }) => {
  const second = { ...tanakaFromMinato(), id: 'letter-second' };
  second.letter = { ...second.letter, patient: { ...second.letter.patient, name: '輪島 次郎' } };
  const fake = new FakeReferrals(second, tanakaFromMinato(), notoToKeiju());
  await openReferrals(page, fake);

  // Tabs: ←/→ switch between 受信箱 and 送信箱.
  const inbox = page.getByTestId('referral-inbox');
  await inbox.focus();
  await page.keyboard.press('ArrowRight');
  await expect(page.getByTestId('referral-outbox')).toBeFocused();
  await expect(page.getByTestId('referral-outbox')).toHaveAttribute('aria-selected', 'true');
  await expect(rows(page)).toHaveCount(1);
  await page.keyboard.press('ArrowLeft');
  await expect(inbox).toBeFocused();
  await expect(rows(page)).toHaveCount(2);

  // The list is one Tab stop; ↑/↓ move, Enter opens.
  await page.keyboard.press('Tab');
  await expect(rows(page).nth(0).getByRole('link')).toBeFocused();
  await page.keyboard.press('ArrowDown');
  await expect(rows(page).nth(1).getByRole('link')).toBeFocused();
  const name = (await rows(page).nth(1).getByRole('link').innerText()).trim();
  await page.keyboard.press('Enter');
  await expect(page.getByRole('heading', { level: 1 })).toBeFocused();
  await expect(page.getByRole('heading', { level: 1 })).toContainText(name);

  // Tab reaches the back button, the print button, the reply box and its button.
  await page.getByTestId('referral-back').focus();
  const reached = new Set<string>();
  for (let i = 0; i < 40; i++) {
    await page.keyboard.press('Tab');
    const id = await page.evaluate(() => {
      const el = document.activeElement as HTMLElement | null;
      return el?.dataset.testid ?? el?.id ?? '';
    });
    reached.add(id);
  }
  expect([...reached]).toEqual(expect.arrayContaining(['referral-print', 'referral-reply-text', 'referral-reply', 'referral-f-purpose']));

  // Back to the list: the letter's row has the focus again.
  await page.getByTestId('referral-back').focus();
  await page.keyboard.press('Enter');
  await expect(rows(page).filter({ hasText: name }).getByRole('link')).toBeFocused();
});

test('the letter prints in the form\'s layout', async ({ page }) => {
  const fake = new FakeReferrals(tanakaFromMinato());
  await page.addInitScript(() => {
    (window as any).__printed = 0;
    window.print = () => {
      (window as any).__printed++;
    };
  });
  await openReferrals(page, fake, {}, { path: '#/referral/letter-tanaka' });
  await expect(page.getByLabel('患者氏名')).toHaveValue('田中 太郎');

  // On screen the print view is hidden; printing shows only the form.
  const sheet = page.getByTestId('referral-print-sheet');
  await expect(sheet).toBeHidden();
  await page.getByTestId('referral-print').click();
  expect(await page.evaluate(() => (window as any).__printed)).toBeGreaterThan(0);

  await page.emulateMedia({ media: 'print' });
  await expect(sheet).toBeVisible();
  await expect(page.locator('#app')).toBeHidden();
  await expect(sheet.getByRole('heading', { level: 1 })).toHaveText('診療情報提供書');
  await expect(sheet).toContainText('野口 英世丸　殿');
  await expect(sheet).toContainText('大河内 勘三郎');
  await expect(sheet).toContainText('1955年5月4日（昭和30年）');
  for (const label of ['傷病名', '紹介目的', '既往歴及び家族歴', '症状経過及び検査結果', '治療経過', '現在の処方', '備考']) {
    await expect(sheet.locator('th', { hasText: label }).first()).toBeVisible();
  }
  await expect(sheet).toContainText('腹痛精査お願いします。');
});

test('a doctor saves the letter as a PDF', async ({ page }) => {
  const fake = new FakeReferrals(tanakaFromMinato());
  let noFont = true;
  const app = await openReferrals(page, fake, {
    'plugin:dialog|save': ({ options }) => `/home/clerk/Documents/${options.defaultPath}`,
    referral_export_pdf: () =>
      noFont ? fail('internal', 'no Japanese font found: install fonts-ipaexfont or fonts-noto-cjk') : null,
  }, { path: '#/referral/letter-tanaka' });

  // Without a Japanese font the engine cannot make it: the sentence says who can fix it.
  await page.getByTestId('referral-pdf').click();
  await expect(page.getByTestId('referral-pdf-error')).toContainText('PDFを作成できませんでした。下の詳細をシステム担当者に伝えてください');
  await page.getByText('詳細', { exact: true }).click();
  await expect(page.getByText('install fonts-ipaexfont or fonts-noto-cjk')).toBeVisible();

  noFont = false;
  await page.getByTestId('referral-pdf').click();
  const path = '/home/clerk/Documents/診療情報提供書_田中太郎_2025-01-09.pdf';
  await expect(page.getByTestId('referral-pdf-done')).toHaveText(`${path} に保存しました。`);
  await expect(page.getByTestId('referral-pdf-error')).toBeHidden();
  expect(app.callsTo('referral_export_pdf').at(-1)).toEqual({ id: 'letter-tanaka', path });
  const [dialog] = app.callsTo('plugin:dialog|save');
  expect(dialog.options.filters).toEqual([{ name: 'PDF', extensions: ['pdf'] }]);
});

test('the screen fits 1280×800 and speaks English when chosen', async ({ page }) => {
  const fake = new FakeReferrals(tanakaFromMinato(), notoToKeiju());
  await openReferrals(page, fake, {}, { lang: 'en' });
  await expect(page.getByTestId('referral-inbox')).toContainText('Inbox');
  await expect(page.getByTestId('referral-outbox')).toContainText('Outbox');
  await expect(rows(page).first()).toContainText('Received');
  const fits = async () =>
    page.evaluate(() => {
      const main = document.querySelector('main') as HTMLElement;
      return main.scrollWidth <= main.clientWidth;
    });
  expect(await fits()).toBe(true);

  await rows(page).first().click();
  await expect(page.getByRole('heading', { level: 1 })).toContainText('Referral letter');
  await expect(page.getByLabel('Purpose of referral')).toHaveValue('腹痛精査お願いします。');
  await expect(page.getByLabel('Sex')).toHaveValue('Male');
  await expect(page.getByTestId('referral-reply')).toHaveText('Send the reply');
  expect(await fits()).toBe(true);
});
