// ケアプラン: user stories of a care manager, with the engine mocked at the IPC boundary.
//
// A small fake engine (below) keeps the plans in Node and answers the careplan commands as the real
// one does (ids, ordering by placement, attribution of entries), so the tests can assert both what
// the engine was asked and what the user then sees.

import { test, expect, type Page } from '@playwright/test';
import { openApp, deferred, fail, sleep, type MockApp, type Handlers } from './support/mock';
import type { PlanView, PlacementInput as Placement, Need, Service } from '../src/lib/bindings';

/** The engine's command names (one place to follow the generated bindings). */
const CMD = {
  list: 'careplan_list',
  get: 'careplan_get',
  create: 'careplan_create',
  edit: 'careplan_edit',
  consent: 'careplan_consent',
  addNeed: 'careplan_add_need',
  addGoal: 'careplan_add_goal',
  addService: 'careplan_add_service',
  editItem: 'careplan_edit_item',
  move: 'careplan_move_item',
  remove: 'careplan_remove_item',
  schedule: 'careplan_schedule',
  addActivity: 'careplan_add_activity',
  nonWeekly: 'careplan_set_non_weekly',
  log: 'careplan_log',
  monitor: 'careplan_monitor',
  comment: 'careplan_comment',
  members: 'careplan_members',
  share: 'careplan_share',
  version: 'careplan_record_version',
  pdf: 'careplan_export_pdf',
  csv: 'careplan_export_csv',
} as const;

const OFFICE = { name: '七尾市居宅介護支援事業所', role: 'care-office' as const };
const STAFF_NAME = '山田 花子';

function blankPlan(id: string, name: string): PlanView {
  return {
    id,
    sheet1: {
      created_on: '2025-01-09',
      changed_on: '2025-01-09',
      first_created_on: '2025-01-09',
      category: { initial: true, referral: false, continuing: false },
      certification: '認定済',
      certified_on: '',
      valid_from: '2025-01-01',
      valid_to: '2025-12-31',
      care_level: '要介護2',
      resident: { name, kana: '', sex: null, birth_date: '1940-04-01', postal_code: '', address: '', phone: '' },
      insurer_number: '',
      insured_number: '',
      assessment: '自宅で暮らし続けたい。',
      committee_opinion: '',
      policy: '転倒を防ぎ、自宅での生活を続けられるよう支援します。',
      housework_reason: null,
      housework_reason_other: '',
      planner: STAFF_NAME,
      office: { name: OFFICE.name, code: '', postal_code: '', address: '' },
      consent: { date: '', by: '' },
    },
    needs: [],
    weekly: { entries: [], activities: [], non_weekly: '' },
    support_log: [],
    monitoring: [],
    comments: [],
    versions: [],
  };
}

/** A fake engine: plans by id, and handlers for every careplan command. */
class FakeEngine {
  plans = new Map<string, PlanView>();
  /** Member facilities by plan (this office owns every plan). */
  members = new Map<string, { facility: string; name: string; role: string; is_self: boolean }[]>();
  snapshots = new Map<string, PlanView[]>();
  #next = 1;

  newId(prefix: string): string {
    return `${prefix}${String(this.#next++).padStart(4, '0')}`;
  }

  add(plan: PlanView): PlanView {
    this.plans.set(plan.id, plan);
    return plan;
  }

  plan(id: string): PlanView {
    const p = this.plans.get(id);
    if (!p) fail('not_found', `no care plan ${id}`);
    return p;
  }

  /** Every sibling list of 第2表 with the item ids in it. */
  lists(p: PlanView): { id: string }[][] {
    const out: { id: string }[][] = [p.needs];
    for (const n of p.needs) {
      out.push(n.goals);
      for (const g of n.goals) {
        out.push(g.short_goals);
        for (const s of g.short_goals) out.push(s.services);
      }
    }
    return out;
  }

  find(p: PlanView, item: string): { list: any[]; obj: any } {
    for (const list of this.lists(p)) {
      const obj = list.find((x) => x.id === item);
      if (obj) return { list, obj };
    }
    for (const list of [p.weekly.entries, p.weekly.activities] as any[][]) {
      const obj = list.find((x) => x.id === item);
      if (obj) return { list, obj };
    }
    fail('invalid_input', `item: no item ${item}`);
  }

  place(list: { id: string }[], obj: { id: string }, placement: Placement) {
    const i = list.indexOf(obj);
    if (i >= 0) list.splice(i, 1);
    let at = list.length;
    if (placement === 'first') at = 0;
    else if (placement === 'last') at = list.length;
    else if ('before' in placement) at = list.findIndex((x) => x.id === placement.before);
    else at = list.findIndex((x) => x.id === placement.after) + 1;
    if (at < 0) fail('invalid_input', 'placement: not a sibling');
    list.splice(at, 0, obj);
  }

  summary(p: PlanView) {
    const s = p.sheet1;
    return {
      id: p.id,
      resident: s.resident.name,
      birth_date: s.resident.birth_date,
      care_level: s.care_level ?? '',
      created_on: s.created_on,
      changed_on: s.changed_on,
      planner: s.planner,
      consented_on: s.consent.date,
      needs: p.needs.length,
      versions: p.versions.length,
    };
  }

  handlers(): Handlers {
    const copy = <T>(x: T): T => JSON.parse(JSON.stringify(x));
    return {
      [CMD.list]: () => [...this.plans.values()].map((p) => this.summary(p)),
      [CMD.get]: ({ id, version }) => {
        const p = this.plan(id);
        if (version == null) return copy(p);
        const snap = this.snapshots.get(id)?.[version - 1];
        if (!snap) fail('not_found', `no version ${version}`);
        return { ...copy(snap), version, versions: copy(p.versions) };
      },
      [CMD.create]: ({ sheet1 }) => {
        const id = `0194a3c2-0000-7000-8000-${String(this.plans.size + 1).padStart(12, '0')}`;
        this.add({ ...blankPlan(id, ''), sheet1 });
        return id;
      },
      [CMD.edit]: ({ id, field, value }) => {
        const s = this.plan(id).sheet1 as any;
        if (field === 'office.code' && value && !/^\d{10}$/.test(value)) {
          fail('invalid_input', `office.code: \`${value}\` is not 10 digits`);
        }
        const [a, b] = String(field).split('.');
        if (b) s[a][b] = value;
        else if (field === 'category') {
          s.category = { initial: value.includes('初回'), referral: value.includes('紹介'), continuing: value.includes('継続') };
        } else s[a] = value === '' && ['care_level', 'certification', 'housework_reason'].includes(a) ? null : value;
        return null;
      },
      [CMD.consent]: ({ id, date, by }) => {
        this.plan(id).sheet1.consent = { date, by };
        return null;
      },
      [CMD.addNeed]: ({ id, text, placement }) => {
        const p = this.plan(id);
        const need: Need = { id: this.newId('need'), text, goals: [] };
        this.place(p.needs, need, placement);
        return need.id;
      },
      [CMD.addGoal]: ({ id, parent, text, period, placement }) => {
        const p = this.plan(id);
        const { obj } = this.find(p, parent);
        if ('goals' in obj) {
          const goal = { id: this.newId('long'), text, period, short_goals: [] };
          this.place(obj.goals, goal, placement);
          return { id: goal.id, kind: 'long_term_goal' };
        }
        const goal = { id: this.newId('short'), text, period, services: [] };
        this.place(obj.short_goals, goal, placement);
        return { id: goal.id, kind: 'short_term_goal' };
      },
      [CMD.addService]: ({ id, goal, service, placement }) => {
        const p = this.plan(id);
        const { obj } = this.find(p, goal);
        const s: Service = { ...service, id: this.newId('svc') };
        this.place(obj.services, s, placement);
        return s.id;
      },
      [CMD.editItem]: ({ id, item, key, value }) => {
        const { obj } = this.find(this.plan(id), item);
        obj[key] = key === 'insured' ? value === 'true' : value;
        return null;
      },
      [CMD.move]: ({ id, item, placement }) => {
        const p = this.plan(id);
        const { list, obj } = this.find(p, item);
        this.place(list, obj, placement);
        return null;
      },
      [CMD.remove]: ({ id, item }) => {
        const { list, obj } = this.find(this.plan(id), item);
        list.splice(list.indexOf(obj), 1);
        return 'need';
      },
      [CMD.schedule]: ({ id, day, start, end, service }) => {
        const p = this.plan(id);
        const e = { id: this.newId('week'), day, start, end, service };
        p.weekly.entries.push(e);
        return e.id;
      },
      [CMD.addActivity]: ({ id, start, end, text }) => {
        const a = { id: this.newId('act'), start, end, text };
        this.plan(id).weekly.activities.push(a);
        return a.id;
      },
      [CMD.nonWeekly]: ({ id, text }) => {
        this.plan(id).weekly.non_weekly = text;
        return null;
      },
      [CMD.log]: ({ id, entry }) => {
        const { date, time, category, text } = entry;
        const e = {
          id: this.newId('log'),
          date: date || '2025-01-09',
          time,
          category,
          text,
          facility: 'f1',
          facility_name: OFFICE.name,
          staff: STAFF_NAME,
          recorded_at: '2025-01-09T05:05:00Z',
        };
        this.plan(id).support_log.push(e);
        return e.id;
      },
      [CMD.monitor]: ({ id, date, goal, text }) => {
        const e = {
          id: this.newId('mon'),
          date: date || '2025-01-09',
          goal: goal ?? '',
          text,
          facility: 'f1',
          facility_name: OFFICE.name,
          staff: STAFF_NAME,
          recorded_at: '2025-01-09T05:05:00Z',
        };
        this.plan(id).monitoring.push(e);
        return e.id;
      },
      [CMD.members]: ({ id }) => {
        this.plan(id);
        return this.members.get(id) ?? [{ facility: 'self', name: OFFICE.name, role: 'owner', is_self: true }];
      },
      [CMD.share]: ({ id, facility, role }, app) => {
        const list = (this.members.get(id) ?? [{ facility: 'self', name: OFFICE.name, role: 'owner', is_self: true }]).filter(
          (m) => m.facility !== facility,
        );
        const name = app.state.facilities.find((f) => f.id === facility)?.name ?? facility;
        if (role) list.push({ facility, name, role, is_self: false });
        this.members.set(id, list);
        return null;
      },
      [CMD.version]: ({ id, note }) => {
        const p = this.plan(id);
        const number = p.versions.length + 1;
        const list = this.snapshots.get(id) ?? [];
        list.push(copy(p));
        this.snapshots.set(id, list);
        p.versions.push({
          number,
          id: this.newId('ver'),
          created_on: p.sheet1.created_on,
          changed_on: p.sheet1.changed_on,
          note,
          facility: 'f1',
          facility_name: OFFICE.name,
          staff: STAFF_NAME,
          recorded_at: '2025-01-09T05:05:00Z',
          heads: ['abc'],
        });
        return number;
      },
    };
  }
}

const NOTO = '0194a3c2-0000-7000-8000-000000000001';
const WAJIMA = '0194a3c2-0000-7000-8000-000000000002';

async function start(page: Page, setup?: (e: FakeEngine) => void, path = '#/careplan', lang?: 'ja' | 'en') {
  const engine = new FakeEngine();
  engine.add(blankPlan(NOTO, '能登 太郎'));
  const other = engine.add(blankPlan(WAJIMA, '輪島 花子'));
  other.sheet1.care_level = '要支援1';
  other.sheet1.consent = { date: '2025-01-05', by: '輪島 花子' };
  setup?.(engine);
  const app = await openApp(page, engine.handlers(), { path, facility: OFFICE, lang });
  return { engine, app };
}

/** The plan's text field for a 第1表 key. */
const field = (page: Page, key: string) => page.locator(`[data-field="${key}"]`);
const saveState = (page: Page) => page.getByTestId('save-state');

function lastCall(app: MockApp, cmd: string) {
  const calls = app.callsTo(cmd);
  return calls[calls.length - 1];
}

test.describe('ケアプラン', () => {
  test('a care manager finds a resident in the list and opens the plan', async ({ page }) => {
    await start(page);
    const rows = page.getByTestId('plan-row');
    await expect(rows).toHaveCount(2);
    const wajima = rows.filter({ hasText: '輪島 花子' });
    await expect(wajima).toContainText('要支援1');
    await expect(wajima).toContainText('同意済（2025年1月5日）');
    await expect(rows.filter({ hasText: '能登 太郎' })).toContainText('未同意');

    await page.getByTestId('plan-filter').fill('能登');
    await expect(rows).toHaveCount(1);
    await rows.first().click();
    await expect(page.getByTestId('plan-title')).toHaveText('能登 太郎 様の居宅サービス計画書');
    await expect(field(page, 'policy')).toHaveValue('転倒を防ぎ、自宅での生活を続けられるよう支援します。');
    await expect(saveState(page)).toHaveText('保存済');
  });

  test('creates a plan for a new resident from 第1表 basics and opens it', async ({ page }) => {
    const { app, engine } = await start(page);
    await page.getByTestId('plan-new').click();
    await page.getByTestId('new-create').click();
    await expect(page.getByRole('alert')).toHaveText('利用者名を入力してください。');
    expect(app.callsTo(CMD.create)).toHaveLength(0);

    await page.getByTestId('new-resident').fill('七尾 一郎');
    await page.getByTestId('new-care-level').selectOption('要介護3');
    await page.getByTestId('new-share').selectOption({ label: '恵寿総合病院' });
    await page.getByTestId('new-create').click();

    await expect(page.getByTestId('plan-title')).toHaveText('七尾 一郎 様の居宅サービス計画書');
    const args = lastCall(app, CMD.create);
    expect(args.sheet1.resident.name).toBe('七尾 一郎');
    expect(args.sheet1.care_level).toBe('要介護3');
    expect(args.sheet1.planner).toBe(STAFF_NAME);
    expect(args.shareWith).toEqual({ facility: '0194a3c2-7d1e-7c3a-9f00-0000000000c2', role: 'writer' });
    expect(engine.plans.size).toBe(3);
    await expect(page.getByTestId('plan-care-level')).toHaveText('要介護3');
  });

  test('a care manager revises the 総合的な援助の方針 and each edit reaches the engine', async ({ page }) => {
    const { app, engine } = await start(page, undefined, `#/careplan/${NOTO}`);
    const policy = field(page, 'policy');
    await expect(policy).toHaveValue(/転倒を防ぎ/);

    // Hold the engine's answer to see the indicator while the edit is on its way.
    const hold = deferred();
    const edit = engine.handlers()[CMD.edit];
    app.handle({
      [CMD.edit]: async (args, a) => {
        await hold.promise;
        return edit(args, a);
      },
    });

    const revised = '転倒を防ぎ、通所介護で入浴と機能訓練を続けます。';
    await policy.fill('');
    await policy.pressSequentially(revised, { delay: 10 });
    await expect(saveState(page)).toHaveText('保存中…');
    hold.resolve();
    await expect(saveState(page)).toHaveText('保存済');

    const edits = app.callsTo(CMD.edit).filter((c) => c.field === 'policy');
    expect(edits.length).toBeGreaterThanOrEqual(1);
    expect(edits.length).toBeLessThan(revised.length); // debounced, not one call per keystroke
    expect(edits[edits.length - 1]).toEqual({ id: NOTO, field: 'policy', value: revised });
    expect(engine.plan(NOTO).sheet1.policy).toBe(revised);

    // Leaving the field sends at once (no wait for the debounce).
    const before = app.callsTo(CMD.edit).length;
    await field(page, 'committee_opinion').fill('通所介護の利用が望ましい。');
    await field(page, 'committee_opinion').press('Tab');
    await expect.poll(() => app.callsTo(CMD.edit).length, { timeout: 300 }).toBeGreaterThan(before);
    await expect(saveState(page)).toHaveText('保存済');

    // Another tab and back: the plan shown has what was typed.
    await page.getByTestId('plan-tab-2').click();
    await page.getByTestId('plan-tab-1').click();
    await expect(field(page, 'policy')).toHaveValue(revised);

    // The engine holds it: a fresh screen shows what was typed.
    await page.reload();
    await expect(field(page, 'policy')).toHaveValue(revised);
    await expect(field(page, 'committee_opinion')).toHaveValue('通所介護の利用が望ましい。');
  });

  test('a choice of 第1表 is sent at once in the form’s words', async ({ page }) => {
    const { app, engine } = await start(page, undefined, `#/careplan/${NOTO}`);
    await field(page, 'care_level').selectOption('要介護4');
    await expect.poll(() => lastCall(app, CMD.edit)).toEqual({ id: NOTO, field: 'care_level', value: '要介護4' });
    await page.getByTestId('category-continuing').check();
    await expect.poll(() => lastCall(app, CMD.edit)).toEqual({ id: NOTO, field: 'category', value: '初回,継続' });
    expect(engine.plan(NOTO).sheet1.category.continuing).toBe(true);
    await expect(saveState(page)).toHaveText('保存済');
  });

  test('an edit the engine refuses is explained in words and the typed text stays', async ({ page }) => {
    await start(page, undefined, `#/careplan/${NOTO}`);
    await field(page, 'office.code').fill('12345');
    await field(page, 'office.code').blur();
    await expect(saveState(page)).toHaveText('保存できませんでした');
    const banner = page.getByTestId('save-error');
    await expect(banner).toContainText('入力内容に誤りがあります');
    await expect(banner).not.toContainText('[object Object]');
    await expect(field(page, 'office.code')).toHaveValue('12345');
    await expect(field(page, 'office.code')).toHaveAttribute('aria-invalid', 'true');

    await field(page, 'office.code').fill('1710000001');
    await field(page, 'office.code').blur();
    await expect(saveState(page)).toHaveText('保存済');
    await expect(banner).toHaveCount(0);
  });

  test('adds a need, a goal and a service, and moves the second need above the first with the keyboard', async ({ page }) => {
    const { app, engine } = await start(
      page,
      (e) => {
        e.plan(NOTO).needs.push({ id: 'need-a', text: '一人での入浴が不安', goals: [] });
      },
      `#/careplan/${NOTO}`,
    );
    await page.getByTestId('plan-tab-2').click();
    const needs = page.getByTestId('need-item');
    await expect(needs).toHaveCount(1);

    // A new need: its text field has the focus, and what is typed is saved.
    await page.getByTestId('need-add').click();
    await expect(needs).toHaveCount(2);
    const second = needs.nth(1);
    await expect(second.getByTestId('need-text')).toBeFocused();
    await page.keyboard.type('買い物に行けない');
    await expect(saveState(page)).toHaveText('保存済');
    const newNeed = engine.plan(NOTO).needs[1];
    expect(newNeed.text).toBe('買い物に行けない');

    // A long-term goal, a short-term goal and a service under it.
    await second.getByTestId('goal-add').click();
    await expect(second.getByTestId('goal-text')).toBeFocused();
    await page.keyboard.type('週1回は買い物に出かけられる');
    await second.getByTestId('goal-period').fill('R7.2.1〜R7.7.31');
    await second.getByTestId('short-goal-add').click();
    await expect(second.getByTestId('short-goal-text')).toBeFocused();
    await page.keyboard.type('ヘルパーと一緒に近所の店へ行く');
    await second.getByTestId('service-add').click();
    const service = second.getByTestId('service-item');
    await expect(service.getByTestId('service-content')).toBeFocused();
    await page.keyboard.type('買い物同行');
    await service.getByTestId('service-kind').fill('訪問介護');
    await service.getByTestId('service-frequency').fill('週1回');
    await service.getByTestId('service-frequency').blur();
    await expect(saveState(page)).toHaveText('保存済');

    const goal = engine.plan(NOTO).needs[1].goals[0];
    expect(goal).toMatchObject({ text: '週1回は買い物に出かけられる', period: 'R7.2.1〜R7.7.31' });
    expect(goal.short_goals[0].text).toBe('ヘルパーと一緒に近所の店へ行く');
    expect(goal.short_goals[0].services[0]).toMatchObject({ content: '買い物同行', kind: '訪問介護', frequency: '週1回', insured: true });
    expect(lastCall(app, CMD.addGoal)).toMatchObject({ id: NOTO, parent: goal.id, placement: 'last' });

    // Alt+↑ in the second need moves it above the first.
    await second.getByTestId('need-text').focus();
    await page.keyboard.press('Alt+ArrowUp');
    await expect.poll(() => lastCall(app, CMD.move)).toEqual({ id: NOTO, item: newNeed.id, placement: { before: 'need-a' } });
    await expect(needs.nth(0).getByTestId('need-text')).toHaveValue('買い物に行けない');
    await expect(needs.nth(1).getByTestId('need-text')).toHaveValue('一人での入浴が不安');
    await expect(needs.nth(0)).toHaveAttribute('aria-label', '課題 1');
    // The focus stays in the moved item, so the next Alt+↓ moves it back.
    await expect(needs.nth(0).getByTestId('need-text')).toBeFocused();
    await expect(saveState(page)).toHaveText('保存済');
    expect(engine.plan(NOTO).needs.map((n) => n.id)).toEqual([newNeed.id, 'need-a']);
    await expect(page.getByTestId('plan-announce')).toHaveText('課題を 1 番目に移動しました。');
  });

  test('moves a need with the visible buttons and with the mouse', async ({ page }) => {
    const { app, engine } = await start(
      page,
      (e) => {
        e.plan(NOTO).needs.push(
          { id: 'need-a', text: '課題A', goals: [] },
          { id: 'need-b', text: '課題B', goals: [] },
          { id: 'need-c', text: '課題C', goals: [] },
        );
      },
      `#/careplan/${NOTO}`,
    );
    await page.getByTestId('plan-tab-2').click();
    const needs = page.getByTestId('need-item');
    const texts = () => needs.getByTestId('need-text').evaluateAll((els) => els.map((e) => (e as HTMLTextAreaElement).value));
    await expect(needs.first().getByTestId('move-up')).toBeDisabled();

    await needs.nth(0).getByTestId('move-down').click();
    await expect.poll(() => lastCall(app, CMD.move)).toEqual({ id: NOTO, item: 'need-a', placement: { after: 'need-b' } });
    await expect.poll(texts).toEqual(['課題B', '課題A', '課題C']);

    // Drag 課題C's bar onto the upper half of 課題B: it goes before it.
    await needs.nth(0).evaluate((e) => e.scrollIntoView({ block: 'start' }));
    const from = (await needs.nth(2).getByTestId('drag-handle').first().boundingBox())!;
    const to = (await needs.nth(0).boundingBox())!;
    await page.mouse.move(from.x + 20, from.y + from.height / 2);
    await page.mouse.down();
    // (below the sticky tab bar, within the upper half of 課題B)
    await page.mouse.move(to.x + 40, to.y + to.height / 2 - 10, { steps: 8 });
    await page.mouse.move(to.x + 40, to.y + to.height / 2 - 30, { steps: 2 });
    await page.mouse.up();
    await expect.poll(() => lastCall(app, CMD.move)).toEqual({ id: NOTO, item: 'need-c', placement: { before: 'need-b' } });
    await expect.poll(texts).toEqual(['課題C', '課題B', '課題A']);
    await expect(saveState(page)).toHaveText('保存済');
    expect(engine.plan(NOTO).needs.map((n) => n.id)).toEqual(['need-c', 'need-b', 'need-a']);
  });

  test('removes a need only after asking', async ({ page }) => {
    const { app, engine } = await start(
      page,
      (e) => {
        e.plan(NOTO).needs.push({ id: 'need-a', text: '課題A', goals: [] }, { id: 'need-b', text: '課題B', goals: [] });
      },
      `#/careplan/${NOTO}`,
    );
    await page.getByTestId('plan-tab-2').click();
    const needs = page.getByTestId('need-item');
    await needs.nth(0).getByTestId('remove').click();
    expect(app.callsTo(CMD.remove)).toHaveLength(0);
    await expect(needs.nth(0).getByTestId('remove-confirm')).toBeFocused();
    await page.keyboard.press('Escape');
    await expect(needs).toHaveCount(2);
    await needs.nth(0).getByTestId('remove').click();
    await needs.nth(0).getByTestId('remove-confirm').click();
    await expect(needs).toHaveCount(1);
    expect(lastCall(app, CMD.remove)).toEqual({ id: NOTO, item: 'need-a' });
    expect(engine.plan(NOTO).needs.map((n) => n.id)).toEqual(['need-b']);
  });

  test('adds a weekly entry that appears in the grid on 水曜日', async ({ page }) => {
    const { app } = await start(page, undefined, `#/careplan/${NOTO}`);
    await page.getByTestId('plan-tab-3').click();
    const grid = page.getByTestId('week-grid');
    await expect(grid.getByTestId('week-entry')).toHaveCount(0);

    await page.getByTestId('week-add').click();
    await expect(page.getByRole('alert')).toHaveText('曜日を選んでください。');

    await page.getByTestId('week-day-wed').check();
    await page.getByTestId('week-start').fill('09:30');
    await page.getByTestId('week-end').fill('15:30');
    await page.getByTestId('week-service').fill('通所介護');
    await page.getByTestId('week-add').click();

    await expect.poll(() => lastCall(app, CMD.schedule)).toEqual({ id: NOTO, day: 'wed', start: '09:30', end: '15:30', service: '通所介護' });
    const wed = grid.locator('[data-testid=week-cell][data-day=wed][data-hour="8"]');
    await expect(wed.getByTestId('week-entry')).toContainText('09:30〜15:30');
    await expect(wed.getByTestId('week-entry')).toContainText('通所介護');
    // The 水曜日 column header is over it, and no other day has it.
    await expect(grid.locator('thead th[data-day=wed]')).toHaveText('水');
    await expect(grid.getByTestId('week-entry')).toHaveCount(1);
    // The hours it lasts through are shaded in the same column.
    await expect(grid.locator('[data-testid=week-cell][data-day=wed][data-hour="12"]')).toHaveClass(/covered/);
    await expect(grid.locator('[data-testid=week-cell][data-day=tue][data-hour="12"]')).not.toHaveClass(/covered/);
  });

  test('records 主な日常生活上の活動 and 週単位以外のサービス on 第3表', async ({ page }) => {
    const { app, engine } = await start(page, undefined, `#/careplan/${NOTO}`);
    await page.getByTestId('plan-tab-3').click();
    await page.getByLabel('開始').last().fill('06:30');
    await page.getByLabel('活動', { exact: true }).last().fill('起床・朝食');
    await page.getByRole('button', { name: '活動を追加' }).click();
    await expect(page.locator('[data-testid=activity-cell][data-hour="6"]')).toContainText('起床・朝食');
    expect(lastCall(app, CMD.addActivity)).toEqual({ id: NOTO, start: '06:30', end: '', text: '起床・朝食' });

    await page.locator('[data-field="weekly.non_weekly"]').fill('福祉用具貸与（手すり）');
    await page.locator('[data-field="weekly.non_weekly"]').blur();
    await expect(saveState(page)).toHaveText('保存済');
    expect(engine.plan(NOTO).weekly.non_weekly).toBe('福祉用具貸与（手すり）');
  });

  test('a colleague’s change arriving live updates the open plan', async ({ page }) => {
    const { app, engine } = await start(page, undefined, `#/careplan/${NOTO}`);
    const policy = field(page, 'policy');
    await expect(policy).toHaveValue('転倒を防ぎ、自宅での生活を続けられるよう支援します。');

    // The family doctor's clinic edits the plan; its bundle arrives here.
    engine.plan(NOTO).sheet1.policy = '転倒を防ぎ、自宅での生活を続けられるよう支援します。主治医と服薬を確認します。';
    engine.plan(NOTO).sheet1.care_level = '要介護3';
    await app.emit('document-changed', { id: NOTO, kind: 'care-plan' });

    await expect(policy).toHaveValue('転倒を防ぎ、自宅での生活を続けられるよう支援します。主治医と服薬を確認します。');
    await expect(page.getByTestId('plan-care-level')).toHaveText('要介護3');
    await expect(page.getByTestId('plan-live')).toBeVisible();

    // Another plan's change does not reload this one.
    const gets = app.callsTo(CMD.get).length;
    await app.emit('document-changed', { id: WAJIMA, kind: 'care-plan' });
    await sleep(200);
    expect(app.callsTo(CMD.get).length).toBe(gets);
  });

  test('a change arriving while typing leaves the typed text alone', async ({ page }) => {
    const { app, engine } = await start(page, undefined, `#/careplan/${NOTO}`);
    const hold = deferred();
    const edit = engine.handlers()[CMD.edit];
    app.handle({
      [CMD.edit]: async (args, a) => {
        await hold.promise;
        return edit(args, a);
      },
    });
    const assessment = field(page, 'assessment');
    await assessment.fill('自宅で暮らし続けたい。娘が週末に来る。');
    await expect(saveState(page)).toHaveText('保存中…');

    engine.plan(NOTO).sheet1.assessment = '自宅で暮らし続けたい。（医師）';
    engine.plan(NOTO).sheet1.policy = '主治医の変更';
    await app.emit('document-changed', { id: NOTO, kind: 'care-plan' });
    await expect(field(page, 'policy')).toHaveValue('主治医の変更');
    await expect(assessment).toHaveValue('自宅で暮らし続けたい。娘が週末に来る。');

    // Once saved, the engine's merge of both is read again.
    engine.handlers(); // (the fake engine keeps the last write; the real one merges characters)
    hold.resolve();
    await expect(saveState(page)).toHaveText('保存済');
    await expect.poll(() => app.callsTo(CMD.get).length).toBeGreaterThanOrEqual(3);
    await expect(assessment).toHaveValue(engine.plan(NOTO).sheet1.assessment);
  });

  test('the list follows plans arriving from other devices', async ({ page }) => {
    const { app, engine } = await start(page);
    await expect(page.getByTestId('plan-row')).toHaveCount(2);
    engine.add(blankPlan('0194a3c2-0000-7000-8000-000000000009', '穴水 次郎'));
    await app.emit('document-changed', { id: '0194a3c2-0000-7000-8000-000000000009', kind: 'care-plan' });
    await expect(page.getByTestId('plan-row').filter({ hasText: '穴水 次郎' })).toBeVisible();
  });

  test('records a 支援経過 entry that the engine attributes to the signed-in staff member', async ({ page }) => {
    const { app } = await start(page, undefined, `#/careplan/${NOTO}`);
    await page.getByTestId('plan-tab-5').click();
    await expect(page.getByTestId('log-empty')).toBeVisible();
    await page.getByTestId('log-date').fill('2025-01-09');
    await page.getByTestId('log-time').fill('14:00');
    await page.getByTestId('log-category').fill('訪問');
    await page.getByTestId('log-text').fill('自宅を訪問。入浴時の転倒の不安を聞き取った。');
    await page.getByTestId('log-add').click();

    const entry = page.getByTestId('log-entry');
    await expect(entry).toHaveCount(1);
    await expect(entry).toContainText('2025年1月9日 14:00');
    await expect(entry).toContainText('訪問');
    await expect(entry).toContainText('入浴時の転倒の不安');
    await expect(entry).toContainText(`記入者: ${STAFF_NAME}（${OFFICE.name}）`);
    const args = lastCall(app, CMD.log);
    expect(args).toEqual({
      id: NOTO,
      entry: { date: '2025-01-09', time: '14:00', category: '訪問', text: '自宅を訪問。入浴時の転倒の不安を聞き取った。' },
    });
    expect(args.entry).not.toHaveProperty('staff');
    await expect(page.getByTestId('log-text')).toHaveValue('');
  });

  test('records monitoring about one goal of 第2表', async ({ page }) => {
    const { app } = await start(
      page,
      (e) => {
        e.plan(NOTO).needs.push({
          id: 'need-a',
          text: '入浴が不安',
          goals: [{ id: 'long-a', text: '安全に入浴できる', period: '', short_goals: [] }],
        });
      },
      `#/careplan/${NOTO}`,
    );
    await page.getByTestId('plan-tab-5').click();
    await page.getByLabel('対象の目標').selectOption({ label: '長期目標 1-1: 安全に入浴できる' });
    await page.getByTestId('monitoring-text').fill('デイで週2回入浴できている。');
    await page.getByTestId('monitoring-add').click();
    await expect(page.getByTestId('monitoring-entry')).toContainText('デイで週2回入浴できている。');
    await expect(page.getByTestId('monitoring-entry')).toContainText('長期目標 1-1: 安全に入浴できる');
    expect(lastCall(app, CMD.monitor)).toMatchObject({ id: NOTO, goal: 'long-a', text: 'デイで週2回入浴できている。' });
  });

  test('the owner shares the plan with the family doctor’s clinic', async ({ page }) => {
    const { app } = await start(page, undefined, `#/careplan/${NOTO}`);
    await page.getByTestId('plan-tab-record').click();
    await expect(page.getByTestId('member-row')).toHaveCount(1);
    await page.getByTestId('member-add').selectOption({ label: '恵寿総合病院（診療所・病院）' });
    await page.getByTestId('member-share').click();
    await expect(page.getByTestId('member-row')).toHaveCount(2);
    await expect(page.getByTestId('member-row').filter({ hasText: '恵寿総合病院' })).toBeVisible();
    expect(lastCall(app, CMD.share)).toEqual({ id: NOTO, facility: '0194a3c2-7d1e-7c3a-9f00-0000000000c2', role: 'writer' });
  });

  test('records consent and a version, then reads the past version read-only', async ({ page }) => {
    const { app, engine } = await start(page, undefined, `#/careplan/${NOTO}`);
    await page.getByTestId('plan-tab-record').click();
    await expect(page.getByTestId('consent-status')).toHaveText('まだ同意を得ていません。');
    await page.getByTestId('consent-date').fill('2025-01-10');
    await expect(page.getByTestId('consent-by')).toHaveValue('能登 太郎');
    await page.getByTestId('consent-record').click();
    await expect(page.getByTestId('plan-consent')).toHaveText('同意済（2025年1月10日）');
    expect(lastCall(app, CMD.consent)).toEqual({ id: NOTO, date: '2025-01-10', by: '能登 太郎' });

    await page.getByTestId('version-note').fill('初回交付');
    await page.getByTestId('version-record').click();
    await expect(page.getByTestId('version-row')).toHaveCount(1);
    await expect(page.getByTestId('version-row')).toContainText('第1版');
    await expect(page.getByTestId('version-row')).toContainText('初回交付');

    // The plan changes after the version...
    await page.getByTestId('plan-tab-1').click();
    await field(page, 'policy').fill('新しい方針');
    await field(page, 'policy').blur();
    await expect(saveState(page)).toHaveText('保存済');
    expect(engine.plan(NOTO).sheet1.policy).toBe('新しい方針');

    // ...and the version still reads as it was, without a way to change it.
    await page.getByTestId('plan-tab-record').click();
    await page.getByTestId('version-view').click();
    await expect(page.getByTestId('version-banner')).toContainText('第1版');
    expect(lastCall(app, CMD.get)).toEqual({ id: NOTO, version: 1 });
    await expect(field(page, 'policy')).toHaveValue('転倒を防ぎ、自宅での生活を続けられるよう支援します。');
    await expect(field(page, 'policy')).toHaveAttribute('readonly', '');
    await page.getByTestId('plan-tab-2').click();
    await expect(page.getByTestId('need-add')).toHaveCount(0);
    await page.getByTestId('version-back').click();
    await expect(page.getByTestId('version-banner')).toHaveCount(0);
    await page.getByTestId('plan-tab-1').click();
    await expect(field(page, 'policy')).toHaveValue('新しい方針');
  });

  test('saves the plan as PDF and exports the CSV, showing progress', async ({ page }) => {
    const { app } = await start(page, undefined, `#/careplan/${NOTO}`);
    const hold = deferred();
    app.handle({
      'plugin:dialog|save': () => '/home/cm/能登太郎.pdf',
      'plugin:dialog|open': () => '/media/usb',
      [CMD.pdf]: async () => {
        await hold.promise;
        return null;
      },
      [CMD.csv]: ({ dir }) => [1, 2, 3, 4].map((n) => `${dir}/file${n}.csv`),
    });
    // An edit typed just before is sent before the PDF is made.
    await field(page, 'policy').fill('印刷前の変更');
    await page.getByTestId('export-pdf').click();
    await expect(page.getByTestId('export-progress')).toHaveText('PDFを作成しています…');
    await expect(page.getByTestId('export-pdf')).toBeDisabled();
    hold.resolve();
    await expect(page.getByTestId('export-done')).toHaveText('PDFを保存しました: /home/cm/能登太郎.pdf');
    await expect(page.getByTestId('export-progress')).toHaveCount(0);
    const order = app.calls.map((c) => c.cmd).filter((c) => c === CMD.edit || c === CMD.pdf);
    expect(order.slice(-2)).toEqual([CMD.edit, CMD.pdf]);
    expect(lastCall(app, CMD.pdf)).toEqual({ id: NOTO, path: '/home/cm/能登太郎.pdf', version: null });
    const dialog = lastCall(app, 'plugin:dialog|save');
    expect(dialog.options.defaultPath).toMatch(/^居宅サービス計画書_能登太郎_\d{4}-\d{2}-\d{2}\.pdf$/);

    await page.getByTestId('export-csv').click();
    await expect(page.getByTestId('export-done')).toHaveText('CSVファイルを 4 件保存しました: /media/usb');
    expect(lastCall(app, CMD.csv)).toEqual({ id: NOTO, dir: '/media/usb', version: null, toOffice: null, toServiceType: null });
    expect(lastCall(app, 'plugin:dialog|open').options.directory).toBe(true);
  });

  test('a failed export says what to do; a cancelled dialog does nothing', async ({ page }) => {
    const { app } = await start(page, undefined, `#/careplan/${NOTO}`);
    app.handle({
      'plugin:dialog|save': () => null,
      [CMD.pdf]: () => fail('storage', 'no Japanese font found'),
    });
    await page.getByTestId('export-pdf').click();
    await sleep(100);
    expect(app.callsTo(CMD.pdf)).toHaveLength(0);
    app.handle({ 'plugin:dialog|save': () => '/tmp/x.pdf' });
    await page.getByTestId('export-pdf').click();
    await expect(page.getByTestId('export-error')).toContainText('ディスクの空き容量を確認');
    await expect(page.getByTestId('export-error')).toContainText('no Japanese font found');
  });

  test('the tabs and the screen work from the keyboard, in English when chosen', async ({ page }) => {
    await start(page, undefined, `#/careplan/${NOTO}`, 'en');
    await expect(page.getByTestId('plan-title')).toHaveText('Care plan of 能登 太郎');
    await expect(saveState(page)).toHaveText('Saved');
    await page.getByTestId('plan-tab-1').focus();
    await page.keyboard.press('ArrowRight');
    await expect(page.getByTestId('plan-tab-2')).toBeFocused();
    await expect(page.getByTestId('plan-tab-2')).toHaveAttribute('aria-selected', 'true');
    await expect(page.getByTestId('need-add')).toHaveText('+ Add a need');
    await page.keyboard.press('End');
    await expect(page.getByTestId('plan-tab-record')).toBeFocused();
    await expect(page.getByTestId('consent-status')).toHaveText('No consent recorded yet.');
    await page.keyboard.press('ArrowRight');
    await expect(page.getByTestId('plan-tab-1')).toBeFocused();
    await expect(page.getByLabel('Overall support policy')).toHaveAttribute('data-field', 'policy');
  });

  test('a plan that cannot be opened says why and offers to try again', async ({ page }) => {
    const { app } = await start(page, undefined, `#/careplan/${NOTO}`, undefined);
    void app;
    await page.goto(`/#/careplan/unknown-plan`);
    await expect(page.getByRole('alert')).toContainText('対象が見つかりません');
    await expect(page.getByRole('button', { name: 'もう一度試す' })).toBeVisible();
  });
});
